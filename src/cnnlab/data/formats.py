"""Readers and writers for the datasets' on-disk formats: IDX files (MNIST, Fashion-MNIST), CIFAR-10 and CIFAR-100
pickles, and (writers only, for tests and benchmarks) folders of image files.

Readers check structure and sizes instead of checksums, so rebuilt but well-formed files load, and every problem
is reported as a UserError naming the file. CIFAR batches are pickles; they are read with an unpickler that admits
only the containers and numpy arrays the format needs, so a hostile batch file cannot run code.
"""

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from cnnlab.errors import UserError

# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes occur in MNIST.
_IDX_UBYTE = 0x08


def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"Cannot read data file {path}: {err.strerror}. Check the path and data.data_dir.") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise UserError(
                f"Data file {path} is not a valid gzip file ({err}); delete it and fetch it again."
            ) from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST images or labels) into a uint8 array of its stored shape."""
    path = Path(path)
    raw = _open_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] == 0:
        raise UserError(
            f"Data file {path} is not an IDX file of unsigned bytes (its first bytes are {raw[:4].hex() or 'missing'}, "
            "expected 000008 then a dimension count). Replace it with the original MNIST file."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"Data file {path} is truncated inside its header; replace it with the original file.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise UserError(
            f"Data file {path} holds {len(raw)} bytes but its header {shape} promises {expected}: the file is "
            "truncated or corrupt. Replace it with the original file."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (as MNIST's files are)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    Path(path).write_bytes(header + array.tobytes())


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds: dicts, lists, bytes, numbers and numpy uint8/int arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    """Load a CIFAR batch or meta file with the restricted unpickler; keys come back as str."""
    path = Path(path)
    raw = _open_bytes(path)
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise UserError(
            f"Data file {path} is not a plain CIFAR batch ({err}); it was not loaded, and nothing in it ran. "
            "Replace it with the original CIFAR-10 python batch."
        ) from None
    except Exception as err:  # truncated or garbage bytes surface as many different exception types
        raise UserError(f"Data file {path} is truncated or corrupt ({type(err).__name__}); replace it.") from None
    if not isinstance(obj, dict):
        raise UserError(f"Data file {path} holds a {type(obj).__name__}, not a CIFAR batch dictionary; replace it.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(
    path: Path, image_shape: tuple[int, int, int] = (3, 32, 32), label_key: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch file into (uint8 images N x C x H x W, int64 labels N).

    label_key: the labels to read, e.g. CIFAR-100's "fine_labels" or "coarse_labels"; None: "labels" (CIFAR-10),
    else "fine_labels".
    """
    batch = read_cifar_pickle(path)
    label_key = label_key or ("labels" if "labels" in batch else "fine_labels")
    if "data" not in batch or label_key not in batch:
        raise UserError(f"Data file {path} lacks the 'data' or '{label_key}' entry of a CIFAR batch; replace it.")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    pixels = int(np.prod(image_shape))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise UserError(
            f"Data file {path} holds images of shape {data.shape} and type {data.dtype}; a CIFAR batch holds "
            f"uint8 rows of {pixels} values. Replace it."
        )
    if len(data) != len(labels):
        raise UserError(f"Data file {path} holds {len(data)} images but {len(labels)} labels; replace it.")
    return data.reshape(len(data), *image_shape), labels


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write (N x 3 x 32 x 32 uint8, N labels) as a CIFAR python batch."""
    batch = {
        b"batch_label": b"cnnlab batch",
        b"labels": [int(v) for v in labels],
        b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1),
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    Path(path).write_bytes(pickle.dumps(batch, protocol=2))


def write_cifar_meta(path: Path, label_names: list[str]) -> None:
    """Write a CIFAR batches.meta file."""
    meta = {b"label_names": [n.encode() for n in label_names], b"num_vis": 3072, b"num_cases_per_batch": 10000}
    Path(path).write_bytes(pickle.dumps(meta, protocol=2))


def write_cifar100_batch(path: Path, images: np.ndarray, fine: np.ndarray, coarse: np.ndarray) -> None:
    """Write (N x 3 x 32 x 32 uint8, N fine labels, N coarse labels) as a CIFAR-100 python file (train or test)."""
    batch = {
        b"batch_label": b"cnnlab batch",
        b"fine_labels": [int(v) for v in fine],
        b"coarse_labels": [int(v) for v in coarse],
        b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), -1),
        b"filenames": [f"{i}.png".encode() for i in range(len(images))],
    }
    Path(path).write_bytes(pickle.dumps(batch, protocol=2))


def write_cifar100_meta(path: Path, fine_names: list[str], coarse_names: list[str]) -> None:
    """Write a CIFAR-100 meta file: the fine and the coarse label names."""
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    Path(path).write_bytes(pickle.dumps(meta, protocol=2))


def write_image_folder(
    root: Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    suffix: str = ".png",
    offset: int = 0,
) -> list[Path]:
    """Write uint8 N x C x H x W images as <root>/<split>/<class name>/<offset + i><suffix> (torchvision's
    ImageFolder layout)."""
    from PIL import Image

    paths = []
    for name in {class_names[int(label)] for label in labels}:
        (Path(root) / split / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (C, H, W) -> (H, W[, C])
        path = Path(root) / split / class_names[int(label)] / f"{offset + i:05d}{suffix}"
        Image.fromarray(np.ascontiguousarray(array)).save(path)
        paths.append(path)
    return paths
