"""read_image: arrays, tensors, PIL, PNG (8/16 bit) and DICOM (window, VOI LUT, MONOCHROME1)."""
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from csr_widgets.data import read_image
from csr_widgets.data.pixels import read_dicom, resize_image


def bundled(name: str) -> str:
    """A test file shipped inside the pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def test_uint8_and_uint16_arrays_are_divided_by_their_range():
    out = read_image(np.array([[0, 51], [102, 255]], np.uint8))
    assert out.shape == (1, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.2], [0.4, 1.0]]))
    out = read_image(np.array([[0, 13107], [65535, 32768]], np.uint16))
    assert torch.allclose(out[0], torch.tensor([[0.0, 0.2], [1.0, 32768 / 65535]]))


def test_floats_bools_and_other_integers():
    assert torch.equal(read_image(np.array([[0.25, 1.0]]))[0], torch.tensor([[0.25, 1.0]]))
    # outside [0, 1]: min..max
    assert torch.allclose(read_image(np.array([[-1.0, 0.0, 3.0]]))[0], torch.tensor([[0.0, 0.25, 1.0]]))
    assert torch.allclose(read_image(np.array([[-1000, 0, 1000]], np.int16))[0], torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.equal(read_image(np.array([[True, False]]))[0], torch.tensor([[1.0, 0.0]]))
    assert torch.equal(read_image(np.full((2, 2), 7.0))[0], torch.zeros(2, 2))  # constant: no division by 0


def test_layouts_channels_and_alpha():
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[1, 2] = (255, 0, 0, 10)
    out = read_image(rgba)
    assert out.shape == (3, 4, 5) and out[:, 1, 2].tolist() == [1.0, 0.0, 0.0]
    grey = read_image(rgba, channels=1)
    assert grey.shape == (1, 4, 5) and grey[0, 1, 2].item() == pytest.approx(0.299)
    chw = torch.zeros(3, 6, 7)
    chw[1, 2, 3] = 0.5
    assert torch.equal(read_image(chw), chw)
    hwc = chw.permute(1, 2, 0)  # a tensor made from an image array: recognised by shape
    assert torch.equal(read_image(hwc), chw)
    assert read_image(torch.zeros(1, 3, 6, 7)).shape == (3, 6, 7)
    assert torch.equal(read_image(np.eye(3), channels=3)[2], torch.eye(3, dtype=torch.float32))
    with pytest.raises(ValueError, match="channel axis"):
        read_image(np.zeros((5, 6, 7)))
    with pytest.raises(TypeError):
        read_image([[0, 1]])


def test_pil_images():
    image = Image.new("RGB", (3, 2), (0, 0, 255))
    assert torch.allclose(read_image(image, channels=1), torch.full((1, 2, 3), 0.114))
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert read_image(palette)[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_16_bit_png_keeps_full_depth(tmp_path):
    values = np.array([[0, 1000], [40000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")
    assert out.shape == (1, 2, 2)
    assert out[0, 0, 1].item() == pytest.approx(1000 / 65535, abs=1e-7)  # 8 bits would give 4/255
    assert out[0, 1, 0].item() == pytest.approx(40000 / 65535, abs=1e-7)
    Image.fromarray(np.array([[0, 128, 255]], np.uint8)).save(tmp_path / "flat.png")
    assert torch.allclose(read_image(str(tmp_path / "flat.png"))[0], torch.tensor([[0.0, 128 / 255, 1.0]]))


def test_dicom_window_centre_width_by_hand():
    # MR_small: 16-bit signed, WindowCenter 600, WindowWidth 1600; first stored values
    # 905, 1019, 1227, 1259 -> (x - 599.5) / 1599 + 0.5
    out = read_image(bundled("MR_small.dcm"))
    assert out.shape == (1, 64, 64)
    assert out[0, 0, :4].tolist() == pytest.approx([0.691057, 0.762352, 0.892433, 0.912445], abs=1e-5)
    explicit = read_image(bundled("MR_small.dcm"), window=(1000, 200))  # (x - 999.5) / 199 + 0.5
    assert explicit[0, 0, :4].tolist() == pytest.approx([0.025126, 0.597990, 1.0, 1.0], abs=1e-5)
    plain = read_image(bundled("MR_small.dcm"), window=None)  # min 127, max 2145
    assert plain[0, 0, 0].item() == pytest.approx((905 - 127) / (2145 - 127), abs=1e-6)


def test_dicom_rescale_without_window_uses_min_max_of_hounsfield_units():
    # CT_small: slope 1, intercept -1024, no window; stored 128..2191, first value 175
    out = read_image(bundled("CT_small.dcm"))
    assert out.shape == (1, 128, 128)
    assert out[0, 0, 0].item() == pytest.approx(47 / 2063, abs=1e-6)
    assert out.min().item() == 0.0 and out.max().item() == 1.0


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inverted.dcm")
    out = read_image(tmp_path / "inverted.dcm")
    assert out[0, 0, 0].item() == pytest.approx(1 - 0.691057, abs=1e-5)
    assert torch.allclose(out, 1 - read_image(bundled("MR_small.dcm")), atol=1e-6)


def test_dicom_is_recognised_without_a_suffix(tmp_path):
    (tmp_path / "scan").write_bytes(open(bundled("MR_small.dcm"), "rb").read())
    assert torch.equal(read_image(tmp_path / "scan"), read_image(bundled("MR_small.dcm")))


def test_voi_lut_sequence_by_hand():
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    pixels = ds.pixel_array.copy()
    pixels[0, :5] = [126, 127, 128, 129, 130]
    ds.PixelData = pixels.tobytes()
    del ds.WindowCenter, ds.WindowWidth
    lut = Dataset()
    lut.LUTDescriptor = [4, 127, 8]  # 4 entries from stored value 127, 8-bit output
    lut.LUTData = [0, 85, 170, 255]
    ds.VOILUTSequence = Sequence([lut])
    out = read_image(ds)  # a pydicom Dataset in memory is accepted too
    assert out[0, 0, :5].tolist() == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0], abs=1e-6)


def test_colour_dicom():
    out = read_image(bundled("SC_rgb_small_odd.dcm"))  # 8-bit RGB, first pixel (166, 141, 52)
    assert out.shape == (3, 3, 3)
    assert out[:, 0, 0].tolist() == pytest.approx([166 / 255, 141 / 255, 52 / 255])


def test_dicom_errors(tmp_path):
    with pytest.raises(ValueError, match="15 frames"):
        read_dicom(bundled("rtdose.dcm"))
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom file at all")
    with pytest.raises(ValueError, match="broken.dcm"):
        read_image(broken)
    no_pixels = tmp_path / "nopixels.dcm"
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(no_pixels)
    with pytest.raises(ValueError, match="no pixel data"):
        read_image(no_pixels)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        read_image(tmp_path / "nowhere.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    with pytest.raises(ValueError, match="junk.png"):
        read_image(junk)


def test_resize_bilinear_and_nearest():
    image = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    up = resize_image(image, 4)
    assert up.shape == (1, 4, 4) and up[0, 0, 0].item() == 0.0 and up[0, 0, 1].item() == pytest.approx(0.25)
    flat = torch.full((1, 8, 8), 0.3)
    assert torch.allclose(resize_image(flat, (2, 4)), torch.full((1, 2, 4), 0.3))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    small = resize_image(mask, 2, mode="nearest")
    assert small.dtype == torch.bool and small[0].tolist() == [[True, False], [False, False]]
