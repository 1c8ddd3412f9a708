"""emmito crop: a box of seg.h5 to proofread, registered back through convert's labels_offset."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from emmito import contract
from emmito.cli import main
from emmito.convert import convert_stack
from emmito.io import read_volume, write_volume
from emmito.suggest import write_suggestions


def seg_file(tmp_path, shape=(10, 40, 50)):
    seg = (np.arange(np.prod(shape), dtype=np.uint32).reshape(shape) // 97) % 5
    path = tmp_path / "vol" / "seg.h5"
    path.parent.mkdir()
    write_volume(path, seg, voxel_size=[40, 8, 8])
    return seg, path


def suggestion_rows(box):
    row = {column: "0" for column in contract.SUGGESTION_COLUMNS}
    row.update(rank=1, kind="uncertain_region", reason="summed uncertainty", view_state="{}")
    row.update(zip(("z0", "y0", "x0", "z1", "y1", "x1"), box))
    return [row, {**row, "rank": 2, "z0": 0, "z1": 3}]


def test_a_suggestions_box_is_cropped_and_registers_back_in_place(tmp_path, capsys):
    seg, seg_path = seg_file(tmp_path)
    write_suggestions(seg_path.parent / contract.SUGGESTIONS_FILE, suggestion_rows([2, 5, 10, 6, 25, 60]))
    out = tmp_path / "box.h5"
    assert main(["crop", str(seg_path), str(out), "--suggestion", "1"]) == 0
    crop, attrs = read_volume(out)
    # x1 60 is clipped to the volume's 50.
    assert np.array_equal(crop, seg[2:6, 5:25, 10:50]) and contract.voxel_size(attrs) == [40.0, 8.0, 8.0]
    said = capsys.readouterr().err
    assert "labels_offset: [2, 5, 10]" in said and f"labels: {out}:/main" in said and "4x20x40 voxels" in said

    # Corrected (an object deleted), then converted on the volume's images: in place, valid in the box only.
    corrected = np.where(crop == 3, 0, crop).astype(np.uint32)
    write_volume(out, corrected, voxel_size=[40, 8, 8])
    images = tmp_path / "image_src.h5"
    write_volume(images, np.full(seg.shape, 120, np.uint8), voxel_size=[40, 8, 8])
    label_out = tmp_path / "label.h5"
    convert_stack(f"{images}:/main", voxel_size=[40, 8, 8], label_paths=f"{out}:/main", label_format="instance",
                  label_out=label_out, labels_offset=[2, 5, 10])
    with h5py.File(label_out, "r") as f:
        label, valid = f["main"][...], f[contract.VALID_MASK][...]
        assert list(f["main"].attrs[contract.VALID_BOX]) == [2, 5, 10, 6, 25, 50]
    assert np.array_equal(label[2:6, 5:25, 10:50], corrected) and not label[:2].any()
    assert valid.sum() == corrected.size and valid[2:6, 5:25, 10:50].all()


def test_box_or_suggestion_mistakes_are_one_line(tmp_path, capsys):
    _, seg_path = seg_file(tmp_path)
    out = tmp_path / "box.h5"
    assert main(["crop", str(seg_path), str(out)]) == 2
    assert "give either --box" in capsys.readouterr().err
    assert main(["crop", str(seg_path), str(out), "--box", "5", "0", "0", "5", "10", "10"]) == 2
    assert "holds no voxel" in capsys.readouterr().err
    write_suggestions(seg_path.parent / contract.SUGGESTIONS_FILE, suggestion_rows([0, 0, 0, 2, 2, 2]))
    assert main(["crop", str(seg_path), str(out), "--suggestion", "7"]) == 2
    assert "no suggestion 7: it has 2 rows" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("box", [[0, 0, 0, 10, 40, 50], [3, 1, 2, 4, 2, 3]])
def test_box_crops_exactly(tmp_path, box):
    seg, seg_path = seg_file(tmp_path)
    out = tmp_path / "box.h5"
    assert main(["crop", str(seg_path), str(out), "--box", *map(str, box)]) == 0
    z0, y0, x0, z1, y1, x1 = box
    assert np.array_equal(read_volume(out)[0], seg[z0:z1, y0:y1, x0:x1])
