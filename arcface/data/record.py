"""A face dataset stored as RecordIO (`train.rec` + `train.idx`), in the InsightFace or the plain layout."""
from __future__ import annotations

import os

import numpy as np

from arcface.data.base import EncodedImageDataset, check_num_classes, warn_if_resized
from arcface.data.decode import decode_into
from arcface.data.record_checks import check_labels, check_offsets, record_labels
from arcface.data.recordio import RecordReader, first_label, read_layout
from arcface.errors import UserError


class RecordDataset(EncodedImageDataset):
    """Images and labels of `root/train.rec`, through `root/train.idx`.

    Checked at start-up from the `.idx` and record headers alone (no image is decoded): every offset lies inside
    the `.rec`, and every image's label is a whole number below the class count, which comes from the identity
    records of the InsightFace layout or from the largest label of a plain file, and is checked against
    `num_classes`.
    """

    def __init__(self, root: str, num_classes: int | None, *, rec: str = "train.rec", idx: str = "train.idx",
                 image_size: int = 112):
        if not os.path.isdir(root):
            raise UserError(f"dataset.root {root} is not a folder: point it at the folder holding {rec} and {idx} "
                            f"(a public set's preset looks in data_dir, which ARCFACE_DATA sets)")
        self.root = root
        self.num_classes = None if num_classes is None else int(num_classes)  # None: counted from the file
        self.image_size = image_size
        self.reader = RecordReader(os.path.join(root, rec), os.path.join(root, idx))
        check_offsets(self.reader)
        self.layout = read_layout(self.reader)
        self.keys = self.layout.image_keys
        if not len(self.keys):
            raise UserError(f"{self.reader.rec_path} holds no image records: re-pack it with "
                            f"`python tools/pack_rec.py SRC {root}`.")
        self._check_classes()
        warn_if_resized(self._record(0)[3], image_size, self.reader.rec_path)

    def _check_classes(self) -> None:
        labels = record_labels(self.reader, self.keys)
        if self.layout.insightface:
            found, what = self.layout.num_identities, "identity records"
            check_labels(self.reader, self.keys, labels, identities=found)
        else:
            check_labels(self.reader, self.keys, labels)
            found, what = int(labels.max()) + 1, "labels"
        if self.num_classes is None:
            self.num_classes = found
            return
        check_num_classes(found, self.num_classes, f"{self.reader.rec_path} has {found} classes (from its {what})")

    def __len__(self) -> int:
        return len(self.keys)

    def _record(self, index: int):
        """(key, offset, IRHeader, image bytes) of image `index`."""
        key = int(self.keys[index])
        offset = self.reader.offset_of(key)
        payload, _ = self.reader.read_at(offset, key)
        return (key, offset) + self.reader.unpack_checked(payload, offset, key)

    def _labelled(self, index: int) -> tuple[int, int, int, bytes]:
        """(key, offset, label, image bytes) of image `index`, its label checked against the class count."""
        key, offset, header, data = self._record(index)
        label = int(first_label(header))
        if not 0 <= label < self.num_classes:
            raise UserError(f"record {key} at offset {offset} of {self.reader.rec_path} has label {label}, outside "
                            f"0..{self.num_classes - 1}: set dataset.num_classes to the number of classes in the file.")
        return key, offset, label, data

    def encoded(self, index: int) -> tuple[int, bytes, int]:
        """(record key, encoded image bytes, label) of image `index`, for loaders that decode elsewhere."""
        key, _, label, data = self._labelled(index)
        return key, data, label

    def load_into(self, index: int, out: np.ndarray) -> int:
        """Decode image `index` into `out` (uint8 (H, W, 3)) and return its label."""
        key, offset, label, data = self._labelled(index)
        try:
            decode_into(data, out)
        except ValueError as e:
            raise UserError(f"record {key} at offset {offset} of {self.reader.rec_path}: {e}; find every bad record "
                            f"with `python tools/inspect_rec.py {self.root}` and re-pack the file.") from None
        return label
