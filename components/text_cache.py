"""Caption embeddings cached on disk, so each caption is encoded once per text encoder.

Training embeds every caption of its dataset with the frozen text encoder before the first
step; across stages (pretrain, quality-tune, distill), re-runs and resumed tasks the captions
are mostly the same, so the embeddings are kept under a cache directory (REELFORGE_CACHE_DIR
on a persistent volume, or the work dir) and only unseen captions are encoded.

Layout: ``<directory>/<key>/rows-<random>.safetensors``, where ``key`` hashes the encoder's
identity and ``max_tokens``, so a different encoder never reads another's rows. Each shard holds
``tokens`` [n,L,D] float32, ``mask`` [n,L] bool and ``pooled`` [n,D] float32, and in its header
the sha256 of each row's caption: the index (caption sha256 -> shard, row) is rebuilt from the
headers, so there is no separate index file for two processes to race on. Shards are written to
a temporary name and renamed (atomic), never modified; a shard that does not read back
(truncated, corrupt, foreign) is reported, deleted and its captions encoded again.
Safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from models.text_encoder import TextEmbeddings

log = logging.getLogger(__name__)

FORMAT = "reelforge-text-cache/1"
SHARD_GLOB = "rows-*.safetensors"


class CaptionEncoder(Protocol):
    """What the cache needs of an encoder (models.text_encoder.TextEncoder has it)."""

    max_tokens: int

    def encode(self, captions: list[str]) -> TextEmbeddings:
        """Embed captions in order."""
        ...


def encoder_identity(encoder: object) -> str:
    """A cache identity for a TextEncoder: its model folder plus the size and mtime of every file
    in it (weights, tokenizer, config), so replaced weights at the same path are a different encoder.

    Hashing the bytes would also catch a same-size same-mtime replacement, but costs seconds for
    a multi-GB cluster encoder on every stage start; a false miss here only costs one re-encode.
    """
    folder = Path(getattr(encoder, "model_path")).resolve()
    entries = [str(folder)]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        entries.append(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}")
    return f"{folder.name}@{hashlib.sha256(chr(10).join(entries).encode()).hexdigest()[:16]}"


def caption_key(caption: str) -> str:
    """The index key of a caption: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """Caption -> TextEmbeddings rows for one encoder, kept as safetensors shards under `directory`."""

    def __init__(self, directory: str | Path, encoder_id: str, max_tokens: int,
                 compact_after: int = 16, small_shard_rows: int = 8192) -> None:
        if not encoder_id:
            raise ValueError("encoder_id must name the encoder (e.g. encoder_identity(encoder))")
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens!r}")
        if compact_after < 2:
            raise ValueError(f"compact_after must be >= 2, got {compact_after!r}")
        self.encoder_id = encoder_id
        self.max_tokens = max_tokens
        # Many small shards (one per run that met new captions) are merged once there are this many.
        self.compact_after = compact_after
        self.small_shard_rows = small_shard_rows
        identity = json.dumps({"format": FORMAT, "encoder": encoder_id, "max_tokens": max_tokens}, sort_keys=True)
        self.directory = Path(directory) / hashlib.sha256(identity.encode()).hexdigest()[:20]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_atomic(self.directory / "encoder.json", identity.encode())  # for people browsing the cache
        self._index: dict[str, tuple[str, int]] = {}  # caption sha256 -> (shard file name, row)
        self._shard_rows: dict[str, int] = {}  # shard file name -> rows, for every shard read so far
        self.encoded = 0  # captions this object encoded (the rest came from disk)

    def __len__(self) -> int:
        """Captions cached on disk, as far as this object has looked."""
        self._refresh()
        return len(self._index)

    def get(self, captions: Sequence[str], encoder: CaptionEncoder) -> TextEmbeddings:
        """Embeddings of `captions` in their order; only captions never cached are encoded (once each)."""
        if isinstance(captions, str):
            raise TypeError("get expects a list of captions, not a single string")
        encoder_tokens = getattr(encoder, "max_tokens", self.max_tokens)
        if encoder_tokens != self.max_tokens:
            raise ValueError(f"encoder.max_tokens is {encoder_tokens} but the cache was opened for "
                             f"max_tokens={self.max_tokens}")
        captions = list(captions)
        if not captions:
            return encoder.encode([])
        unique = list(dict.fromkeys(captions))
        keys = [caption_key(c) for c in unique]
        rows = self._read(keys)
        missing = [(key, caption) for key, caption in zip(keys, unique) if key not in rows]
        if missing:
            fresh = encoder.encode([caption for _, caption in missing])
            self._check(fresh, len(missing), "the encoder's output")
            self.encoded += len(missing)
            self._write([key for key, _ in missing], fresh)
            for i, (key, _) in enumerate(missing):
                rows[key] = (fresh.tokens[i], fresh.mask[i], fresh.pooled[i])
            self._compact_if_needed()
        widths = {rows[key][0].shape[-1] for key in keys}
        if len(widths) != 1:
            raise ValueError(f"cached rows disagree on the embedding width {sorted(widths)}: "
                             f"encoder_id {self.encoder_id!r} names two different encoders")
        table = TextEmbeddings(torch.stack([rows[k][0] for k in keys]), torch.stack([rows[k][1] for k in keys]),
                               torch.stack([rows[k][2] for k in keys]))
        position = {caption: i for i, caption in enumerate(unique)}
        if len(unique) == len(captions):
            return table
        return table.select(torch.tensor([position[c] for c in captions]))

    # --- reading ----------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Read the headers of shards written since the last look (by this or another process)."""
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            if path.name in self._shard_rows:
                continue
            try:
                keys = self._header(path)
            except FileNotFoundError:
                continue  # merged away by another process meanwhile
            except Exception as error:  # noqa: BLE001 - any unreadable shard is rebuilt, never fatal
                self._discard(path, error)
                continue
            self._shard_rows[path.name] = len(keys)
            for row, key in enumerate(keys):
                self._index.setdefault(key, (path.name, row))

    def _header(self, path: Path) -> list[str]:
        """Caption keys of a shard after checking that its header belongs to this cache."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as shard:
            meta = shard.metadata() or {}
            shapes = {name: shard.get_slice(name).get_shape() for name in shard.keys()}
        if meta.get("format") != FORMAT or meta.get("encoder_id") != self.encoder_id \
                or meta.get("max_tokens") != str(self.max_tokens):
            raise ValueError(f"header is for another encoder or format: {meta.get('encoder_id')!r}")
        keys = json.loads(meta["captions_sha256"])
        count = len(keys)
        tokens = shapes.get("tokens", [])
        if len(tokens) != 3 or tokens[:2] != [count, self.max_tokens] or shapes.get("mask") != tokens[:2] \
                or shapes.get("pooled") != [count, tokens[2]]:
            raise ValueError(f"tensor shapes {shapes} do not match {count} captions of {self.max_tokens} tokens")
        return keys

    def _read(self, keys: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows for the keys found on disk; a shard that fails to load is discarded (its rows go missing)."""
        from safetensors import safe_open

        found: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for attempt in range(2):  # a second look finds rows that a concurrent merge moved
            self._refresh()
            wanted: dict[str, list[tuple[str, int]]] = {}
            for key in keys:
                if key not in found and key in self._index:
                    shard, row = self._index[key]
                    wanted.setdefault(shard, []).append((key, row))
            vanished = False
            for shard, entries in wanted.items():
                path = self.directory / shard
                try:
                    with safe_open(str(path), framework="pt") as handle:
                        tokens, mask, pooled = (handle.get_tensor(n) for n in ("tokens", "mask", "pooled"))
                    if tokens.dtype != torch.float32 or mask.dtype != torch.bool or pooled.dtype != torch.float32:
                        raise ValueError(f"unexpected dtypes {tokens.dtype}, {mask.dtype}, {pooled.dtype}")
                except FileNotFoundError:
                    self._forget(shard)
                    vanished = True
                    continue
                except Exception as error:  # noqa: BLE001
                    self._discard(path, error)
                    continue
                for key, row in entries:
                    found[key] = (tokens[row], mask[row], pooled[row])
            if not vanished:
                break
        return found

    def _forget(self, shard: str) -> None:
        self._shard_rows.pop(shard, None)
        self._index = {k: v for k, v in self._index.items() if v[0] != shard}

    def _discard(self, path: Path, error: BaseException) -> None:
        """Warn about an unreadable shard and delete it; its captions are encoded again."""
        log.warning("text embedding cache: ignoring unreadable %s (%s: %s); its captions will be re-encoded",
                    path, type(error).__name__, error)
        self._forget(path.name)
        self._shard_rows[path.name] = 0  # never read it again in this process, even if deleting fails
        try:
            path.unlink()
        except OSError:
            pass

    # --- writing ----------------------------------------------------------------------------

    def _check(self, embeddings: TextEmbeddings, count: int, what: str) -> None:
        tokens, mask, pooled = embeddings.tokens, embeddings.mask, embeddings.pooled
        if tokens.ndim != 3 or tuple(tokens.shape[:2]) != (count, self.max_tokens) \
                or tuple(mask.shape) != (count, self.max_tokens) or tuple(pooled.shape) != (count, tokens.shape[2]):
            raise ValueError(f"{what} has shapes tokens {tuple(tokens.shape)}, mask {tuple(mask.shape)}, pooled "
                             f"{tuple(pooled.shape)}; expected {count} captions of {self.max_tokens} tokens")

    def _write(self, keys: list[str], embeddings: TextEmbeddings) -> None:
        """Store rows as a new shard (temp file + rename: readers see all of it or nothing)."""
        from safetensors.torch import save

        tensors = {
            "tokens": embeddings.tokens.detach().to(torch.float32).contiguous(),
            "mask": embeddings.mask.detach().to(torch.bool).contiguous(),
            "pooled": embeddings.pooled.detach().to(torch.float32).contiguous(),
        }
        metadata = {"format": FORMAT, "encoder_id": self.encoder_id, "max_tokens": str(self.max_tokens),
                    "captions_sha256": json.dumps(keys)}
        name = f"rows-{uuid.uuid4().hex}.safetensors"
        try:
            self._write_atomic(self.directory / name, save(tensors, metadata=metadata))
        except OSError as error:
            # A full or read-only cache volume must not stop training: the rows are in memory.
            log.warning("text embedding cache: could not write %s (%s)", self.directory / name, error)
            return
        self._shard_rows[name] = len(keys)
        for row, key in enumerate(keys):
            self._index.setdefault(key, (name, row))

    @staticmethod
    def _write_atomic(path: Path, payload: bytes) -> None:
        temporary = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        try:
            with open(temporary, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def _compact_if_needed(self) -> None:
        """Merge small shards into one once there are `compact_after` of them (bounded memory)."""
        small = [name for name, rows in self._shard_rows.items()
                 if 0 < rows < self.small_shard_rows and (self.directory / name).exists()]
        if len(small) < self.compact_after:
            return
        keys = list(dict.fromkeys(k for k, (shard, _) in self._index.items() if shard in small))
        rows = self._read(keys)
        keys = [k for k in keys if k in rows]
        if not keys:
            return
        merged = TextEmbeddings(torch.stack([rows[k][0] for k in keys]), torch.stack([rows[k][1] for k in keys]),
                                torch.stack([rows[k][2] for k in keys]))
        before = set(self._shard_rows)
        self._write(keys, merged)
        new = next(iter(set(self._shard_rows) - before), None)
        if new is None:
            return  # the merged shard could not be written: keep the small ones
        for name in small:
            self._forget(name)
            (self.directory / name).unlink(missing_ok=True)
        for row, key in enumerate(keys):
            self._index[key] = (new, row)
