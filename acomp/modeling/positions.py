"""Position ids per model family: the one place where OPT and RoPE decoders differ.

Each segment is laid out as [softprompt (P) ; segment tokens (n) ; summary tokens (k)].

- OPT (learned absolute positions): softprompt and summary tokens get OPT's padding position
  (id -1, i.e. table row 1, which is zero in pretrained OPT), and text tokens are numbered from 0
  by the attention mask as if no softprompt were there. Summary vectors consume no positions, so
  every segment can use the full pretrained window (the original's rule).
- RoPE (Llama, Mistral, Qwen2, ...): consecutive positions over the concatenation, softprompt at
  0..P-1, text from P, summary tokens after the last real text token (the original's rule). Pads
  consume no positions, so padded and unpadded samples see identical positions.
"""

from __future__ import annotations

import torch


class PositionRule:
    """Computes `position_ids` for one segment forward and for incremental decoding."""

    name = "base"
    softprompt_consumes_positions: bool
    learned_table: bool  # positions index a learned table that ends at max_position_embeddings

    def segment(
        self,
        softprompt_len: int,
        text_mask: torch.Tensor,
        num_summary: int,
        softprompt_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Positions [B, P + n + k] for a segment with text mask [B, n] (1 = real token). `softprompt_len` is the
        number of positions the softprompt takes; a compacted softprompt (softprompt.py) also gives its
        vectors' own positions [B, P] among them."""
        text_mask = text_mask.long()
        batch = text_mask.shape[0]
        device = text_mask.device
        counts = text_mask.cumsum(dim=1)  # 1-based index of each real token
        if softprompt_positions is None:
            softprompt_positions = torch.arange(softprompt_len, device=device).expand(batch, -1)
        if self.softprompt_consumes_positions:
            soft = softprompt_positions
            text = (softprompt_len + counts - 1).clamp(min=0)
            summary = softprompt_len + counts[:, -1:] + torch.arange(num_summary, device=device)
        else:
            soft = torch.full_like(softprompt_positions, -1)
            text = torch.where(text_mask.bool(), counts - 1, -1)
            summary = torch.full((batch, num_summary), -1, device=device, dtype=torch.long)
        return torch.cat([soft, text, summary], dim=1)

    def first_new_position(self, softprompt_len: int, text_mask: torch.Tensor) -> torch.Tensor:
        """Position [B] of the token that follows the prompt described by text_mask [B, n]."""
        base = softprompt_len if self.softprompt_consumes_positions else 0
        return base + text_mask.long().sum(dim=1)


class RotaryPositions(PositionRule):
    name = "rope"
    softprompt_consumes_positions = True
    learned_table = False


class OPTPositions(PositionRule):
    name = "opt"
    softprompt_consumes_positions = False
    learned_table = True
