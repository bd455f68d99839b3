"""A jupyter_server extension: TCP_NODELAY on kernel websockets (docs/decisions.md#tcp-nodelay).

Stock jupyter_server leaves Nagle's algorithm on for the kernel websocket, so each small
reply (a widget update after a mouse-up) can wait ~40 ms for the browser's delayed ACK.
Turning it off took the explorer's mouse-up -> new heatmap time from ~80 ms to ~42 ms.

Enable with ``jupyter server extension enable csr_widgets.widgets.server`` or
``--ServerApp.jpserver_extensions='{"csr_widgets.widgets.server": True}'``. It applies to
every handler derived from jupyter_server's KernelWebsocketHandler (JupyterLab, Notebook 7,
Voila running as a server extension).
"""
from __future__ import annotations


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": __name__}]


def _load_jupyter_server_extension(serverapp) -> None:
    if set_nodelay_on_kernel_websockets():
        serverapp.log.info("csr_widgets: TCP_NODELAY set on kernel websockets")


def set_nodelay_on_kernel_websockets() -> bool:
    """Make every kernel websocket send without Nagle's delay; True if newly installed."""
    from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

    if getattr(KernelWebsocketHandler, "_csr_widgets_nodelay", False):
        return False
    original_open = KernelWebsocketHandler.open

    async def open(self, *args, **kwargs):
        self.set_nodelay(True)  # tornado's own switch for this connection's socket
        return await original_open(self, *args, **kwargs)

    KernelWebsocketHandler.open = open
    KernelWebsocketHandler._csr_widgets_nodelay = True
    return True
