"""Webdataset-style tar shards of captioned videos (and of pre-decoded clips / latents).

A shard ``shard-000042.tar`` holds, per sample ``<key>``, consecutive members

* video shards: ``<key>.<ext>`` (the encoded file as is: webm, mp4, ...), ``<key>.txt`` (caption),
  ``<key>.json`` (``codec``, ``fps``, ``frames``, ``width``, ``height``, ``source``);
* latent shards: ``<key>.frames.npy`` (the decoded, resized, cropped uint8 clip ``[T, H, W, 3]``;
  left out with ``prepare_data.py --no-frames``), optionally ``<key>.latent.npy`` (the codec's
  normalised latent ``[T', H', W', C]`` float32, for codecs that are not lossless: the lossless
  space-to-depth codec must see the pixels to draw fresh dequantisation noise each step) and
  ``<key>.text.npy`` (frozen text encoder output ``[L, width]`` of the formatted caption), plus
  ``.txt`` and ``.json``. Once per shard set, ``null_text.npy`` holds the encoder output of the
  empty caption (what caption dropout trains on), and ``shards.json`` states what the latents
  and embeddings were made with (``data/latent_shards.py`` checks it against the run's config).

Shards are written under a temporary name and renamed when complete, so a reader never sees a half
written shard; ``shards.json`` lists the finished shards and their sample counts.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time

import numpy as np

from megatron_starflow.data.video import VideoRecord, records_from_tar


class ShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples / ``max_bytes``."""

    def __init__(self, out_dir: str, max_count: int = 256, max_bytes: int = 1 << 30,
                 prefix: str = "shard"):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.max_count, self.max_bytes, self.prefix = out_dir, max_count, max_bytes, prefix
        self.shards: list[dict] = []
        self._tar = None
        self._count = self._bytes = 0
        self._name = self._tmp = ""
        self._closed = False

    def _open(self) -> None:
        self._name = os.path.join(self.out_dir, f"{self.prefix}-{len(self.shards):06d}.tar")
        self._tmp = os.path.join(self.out_dir, f".{self.prefix}-{len(self.shards):06d}.tar.partial")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self._name)
        self.shards.append({"file": os.path.basename(self._name), "samples": self._count})
        self._tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """``members``: extension (``"webm"``, ``"txt"``, ``"frames.npy"``, ...) -> bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        size = sum(len(v) for v in members.values())
        if self._tar is not None and (self._count >= self.max_count or self._bytes + size > self.max_bytes):
            self._close_shard()
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def close(self, extra: dict | None = None) -> list[dict]:
        """Finish the last shard and write ``shards.json`` (once: closing again, e.g. on leaving
        the ``with`` block, keeps the manifest written with ``extra``)."""
        if self._closed:
            return self.shards
        self._closed = True
        self._close_shard()
        manifest = {"shards": self.shards, "samples": sum(s["samples"] for s in self.shards),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        tmp = os.path.join(self.out_dir, ".shards.json.partial")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, os.path.join(self.out_dir, "shards.json"))
        return self.shards

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        elif self._tar is not None:  # failed: leave no partial shard behind
            self._tar.close()
            os.remove(self._tmp)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_npy(path: str, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` under a temporary name, then rename (never half written)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.partial")
    with open(tmp, "wb") as f:
        f.write(npy_bytes(array))
    os.replace(tmp, path)


def read_manifests(spec: str) -> list[tuple[str, dict]]:
    """``(folder, shards.json)`` of every folder that holds shards of ``spec`` (in order)."""
    out, seen = [], set()
    for path in list_shards(spec):
        folder = os.path.dirname(os.path.abspath(path))
        if folder in seen:
            continue
        seen.add(folder)
        manifest = os.path.join(folder, "shards.json")
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"{folder} has shards but no shards.json: shards made by "
                                    f"tools/prepare_data.py carry one (it may still be running)")
        with open(manifest) as f:
            out.append((folder, json.load(f)))
    return out


def list_shards(spec: str) -> list[str]:
    """A folder (its ``*.tar``), a glob, or a comma-separated list of those -> sorted tar paths."""
    paths: list[str] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if os.path.isdir(part):
            paths.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
        else:
            found = sorted(glob.glob(part))
            if not found:
                raise FileNotFoundError(f"no shards match {part!r}")
            paths.extend(found)
    paths = [p for p in paths if not os.path.basename(p).startswith(".")]
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {spec!r}; make some with tools/prepare_data.py")
    return paths


def read_shards(spec: str) -> tuple[list[VideoRecord], list[int]]:
    """All records of the shards in ``spec`` (in shard order) and each shard's sample count."""
    records, sizes = [], []
    for path in list_shards(spec):
        recs = records_from_tar(path)
        records.extend(recs)
        sizes.append(len(recs))
    return records, sizes
