"""The local stencil of :class:`~structvae.distributions.SparsePrecisionNormal`: products and solves with L.

L is the Cholesky factor of the precision Λ = LLᵀ over an image of ``C×H×W`` values, lower-triangular
in *raster order over (pixel, channel)*: value (c, h, w) has index ``(h·W + w)·C + c``. Column j =
(c, h, w) of L holds

* the diagonal L_jj = exp(log_diag[c, h, w]) > 0, and
* K = C·(k² − 1)/2 + C − 1 off-diagonal *slots* ``off_diag[c, s, h, w]`` = L_ij at rows i *after* j:
  for each of the (k² − 1)/2 later pixel offsets (dh, dw) of the k×k window — ``dh > 0``, or ``dh = 0``
  and ``dw > 0``, in the order of :attr:`PrecisionStencil.offsets` — one slot per channel c′ of that
  pixel (slot ``p·C + c′``), then C − 1 slots for the later channels c + 1, …, c + C − 1 of the same
  pixel (slot ``P·C + m − 1`` for channel c + m).

Slots whose row falls outside the image (or the channel range) are not part of L: every routine here
ignores them (they get a zero gradient). Equivalently, row i of L has non-zeros at the pixels of its
k×k window that *precede* it in raster order — Dorta et al.'s "local neighbourhood" pattern.

Products. ``(Lᵀx)_j = L_jj x_j + Σ_s off_diag[j, s]·x[row(j, s)]`` is a gather of shifted copies of x
(zero padding at the borders): O(S·K) time, never an S×S matrix (:func:`apply_lt`).

Solves. Lᵀy = b (sampling) and Lu = b (covariance rows) are triangular solves whose structure is local:
in raster order an image row depends only on the k//2 rows after it (Lᵀ) or before it (L). They run
row by row — H sequential steps — each step gathering the contribution of the ≤ k//2 solved rows
(O(W·C·K) per right-hand side) and solving the row's own banded (W·C)×(W·C) triangular block with one
batched dense ``torch.linalg.solve_triangular`` (O((W·C)²) per right-hand side, vectorised over the
batch and over all right-hand sides at once). Cost per image and right-hand side: O(H·(W·C)²) =
O(S·W·C) time and O((W·C)²) extra memory per step; the number of sequential steps grows as √S (H),
not as S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _shift_w(x: Tensor, dw: int) -> Tensor:
    """``out[..., w] = x[..., w + dw]``, zero where ``w + dw`` is outside the row (negative pads crop)."""
    return F.pad(x, (-dw, dw)) if dw else x


def _shift_hw(x: Tensor, dh: int, dw: int) -> Tensor:
    """``out[..., h, w] = x[..., h + dh, w + dw]`` over the last two dims, zero outside the image."""
    return F.pad(x, (-dw, dw, -dh, dh)) if dh or dw else x


def _shift_c(x: Tensor, m: int) -> Tensor:
    """``out[..., c, :, :] = x[..., c + m, :, :]`` over dim −3, zero beyond the last channel."""
    return F.pad(x, (0, 0, 0, 0, -m, m))


def num_off_diagonal(channels: int, kernel_size: int) -> int:
    """K, the off-diagonal slots per value: C·(k² − 1)/2 neighbour-pixel slots + C − 1 same-pixel ones."""
    return channels * (kernel_size * kernel_size - 1) // 2 + channels - 1


class PrecisionStencil:
    """Index bookkeeping for images ``(C, H, W)`` and an odd neighbourhood ``kernel_size`` (see module doc)."""

    def __init__(self, image_shape: tuple[int, int, int], kernel_size: int) -> None:
        self.image_shape = tuple(int(v) for v in image_shape)
        C, H, W = self.image_shape
        self.kernel_size = k = int(kernel_size)
        self.radius = r = k // 2
        #: the later pixel offsets (dh, dw) of the k×k window, in slot order
        self.offsets = [(dh, dw) for dh in range(r + 1) for dw in range(-r, r + 1) if dh > 0 or dw > 0]
        self.num_slots = num_off_diagonal(C, k)
        offs = torch.tensor(self.offsets, dtype=torch.long).reshape(-1, 2)
        P = len(self.offsets)
        s = torch.arange(self.num_slots)
        c = torch.arange(C).view(C, 1)
        nb = s < P * C
        dh = torch.where(nb, offs[(s // C).clamp_max(max(P - 1, 0)), 0], 0) if P else torch.zeros_like(s)
        dw = torch.where(nb, offs[(s // C).clamp_max(max(P - 1, 0)), 1], 0) if P else torch.zeros_like(s)
        row_c = torch.where(nb, s % C, c + (s - P * C + 1))  # [C, K]: channel of each slot's row
        self._slot_dh, self._slot_dw, self._slot_c = dh, dw, row_c
        self._build_row_block()

    # ------------------------------------------------------------------ index tables
    def entries(self) -> tuple[Tensor, Tensor]:
        """(valid [C, K, H, W] bool, row index [C, K, H, W] into the flat (c, h, w) event) of every slot."""
        C, H, W = self.image_shape
        h = torch.arange(H).view(1, 1, H, 1)
        w = torch.arange(W).view(1, 1, 1, W)
        hr = h + self._slot_dh.view(1, -1, 1, 1)
        wr = w + self._slot_dw.view(1, -1, 1, 1)
        cr = self._slot_c.view(C, -1, 1, 1)
        valid = (hr < H) & (wr >= 0) & (wr < W) & (cr < C)
        row = (cr.clamp_max(C - 1) * H + hr.clamp_max(H - 1)) * W + wr.clamp(0, W - 1)
        return valid.expand(C, -1, H, W), row.expand(C, -1, H, W)

    def _build_row_block(self) -> None:
        """Indices that scatter one image row's diagonal and dh = 0 slots into its (W·C)² block of Lᵀ.

        Block order q = w·C + c (raster order within the row): upper-triangular. Source vector per row:
        ``cat(diag [C, W], off_diag [C, K, W])`` flattened; the same tables serve every row.
        """
        C, _, W = self.image_shape
        n = W * C
        c = torch.arange(C).view(C, 1)
        w = torch.arange(W).view(1, W)
        q = w * C + c  # [C, W]
        src = [(c * W + w).flatten()]
        dst = [(q * (n + 1)).flatten()]
        for slot in range(self.num_slots):
            if int(self._slot_dh[slot]) != 0:
                continue
            dw = int(self._slot_dw[slot])
            cr = self._slot_c[:, slot].view(C, 1)
            valid = ((w + dw < W) & (cr < C)).expand(C, W)
            q_row = (w + dw) * C + cr  # the row of L (= column of the block of Lᵀ)
            src.append((C * W + (c * self.num_slots + slot) * W + w)[valid])
            dst.append((q * n + q_row)[valid])
        self._block_src = torch.cat(src)
        self._block_dst = torch.cat(dst)

    def _row_blocks(self, dh: int) -> slice:
        """Slots of the 2r + 1 offsets (dh, −r…r) for dh ≥ 1, ordered (dw, c′): a contiguous range."""
        C, r = self.image_shape[0], self.radius
        start = (r + (dh - 1) * (2 * r + 1)) * C
        return slice(start, start + (2 * r + 1) * C)

    # ------------------------------------------------------------------ dense (tests, small images)
    def dense_factor(self, log_diag: Tensor, off_diag: Tensor) -> Tensor:
        """L as a dense [..., S, S] matrix in the flat (c, h, w) event order. O(S²) memory: tests only."""
        C, H, W = self.image_shape
        S = C * H * W
        valid, row = self.entries()
        col = torch.arange(S).view(C, 1, H, W).expand_as(row)
        dst = torch.cat([torch.arange(S) * (S + 1), (row * S + col)[valid]]).to(log_diag.device)
        vals = torch.cat([log_diag.exp().flatten(-3), off_diag[..., valid.to(off_diag.device)]], -1)
        dense = vals.new_zeros(vals.shape[:-1] + (S * S,)).index_copy(-1, dst, vals)
        return dense.unflatten(-1, (S, S))

    # ------------------------------------------------------------------ products
    def apply_lt(self, log_diag: Tensor, off_diag: Tensor, x: Tensor) -> Tensor:
        """Lᵀx for images ``x`` [..., C, H, W] (broadcasting with the parameters' batch): O(S·K).

        ``log_diag`` [..., C, H, W], ``off_diag`` [..., C, K, H, W]. Slots pointing outside the image read
        the zero padding, so they contribute nothing and get a zero gradient.
        """
        C = self.image_shape[0]
        P = len(self.offsets)
        out = log_diag.exp() * x
        if P:
            nb = torch.stack([_shift_hw(x, dh, dw) for dh, dw in self.offsets], -4).flatten(-4, -3)  # [..., P·C, H, W]
            out = out + (off_diag[..., : P * C, :, :] * nb.unsqueeze(-4)).sum(-3)
        if C > 1:
            same = torch.stack([_shift_c(x, m) for m in range(1, C)], -3)  # [..., C, C-1, H, W]
            out = out + (off_diag[..., P * C :, :, :] * same).sum(-3)
        return out

    # ------------------------------------------------------------------ solves
    def _row_block(self, log_diag: Tensor, off_diag: Tensor, h: int) -> Tensor:
        """The (W·C)×(W·C) upper-triangular block of Lᵀ for image row h, [B, W·C, W·C]."""
        C, _, W = self.image_shape
        n = W * C
        vals = torch.cat([log_diag[:, :, h, :].exp().flatten(1), off_diag[:, :, :, h, :].flatten(1)], 1)
        src, dst = self._block_src.to(vals.device), self._block_dst.to(vals.device)
        block = vals.new_zeros(vals.shape[0], n * n).index_copy(1, dst, vals.index_select(1, src))
        return block.view(-1, n, n)

    @staticmethod
    def _to_block(b: Tensor) -> Tensor:
        """[N, B, C, W] → [B, W·C, N] (block order q = w·C + c, right-hand sides last)."""
        N, B, C, W = b.shape
        return b.permute(1, 3, 2, 0).reshape(B, W * C, N)

    @staticmethod
    def _from_block(y: Tensor, C: int) -> Tensor:
        """Inverse of :meth:`_to_block`."""
        B, n, N = y.shape
        return y.reshape(B, n // C, C, N).permute(3, 0, 2, 1)

    def solve_lt(self, log_diag: Tensor, off_diag: Tensor, b: Tensor) -> Tensor:
        """y with Lᵀy = b. ``b`` [N, B, C, H, W] (N right-hand sides per item), parameters [B, …] → [N, B, C, H, W].

        Back substitution by image rows, last row first: row h needs the solved rows h+1 … h+r.
        """
        C, H, _ = self.image_shape
        r = self.radius
        rows: list[Tensor | None] = [None] * H
        for h in range(H - 1, -1, -1):
            rhs = b[..., h, :]
            for dh in range(1, r + 1):
                if h + dh >= H:
                    break
                shifted = torch.stack([_shift_w(rows[h + dh], dw) for dw in range(-r, r + 1)], 2).flatten(2, 3)
                rhs = rhs - torch.einsum("bcsw,nbsw->nbcw", off_diag[:, :, self._row_blocks(dh), h, :], shifted)
            block = self._row_block(log_diag, off_diag, h)
            y = torch.linalg.solve_triangular(block, self._to_block(rhs), upper=True)
            rows[h] = self._from_block(y, C)
        return torch.stack(rows, -2)  # type: ignore[arg-type]

    def solve_l(self, log_diag: Tensor, off_diag: Tensor, b: Tensor, start_row: int = 0) -> Tensor:
        """u with Lu = b, shapes as :meth:`solve_lt`. Forward substitution by image rows, first row first.

        ``start_row``: b is zero on the rows before it, so u is too (L is lower-triangular) and they are skipped.
        """
        C, H, _ = self.image_shape
        r = self.radius
        rows: list[Tensor] = [torch.zeros_like(b[..., 0, :])] * start_row
        for h in range(start_row, H):
            rhs = b[..., h, :]
            for dh in range(1, r + 1):
                if h - dh < start_row:
                    break
                prod = torch.einsum("bcsw,nbcw->nbsw", off_diag[:, :, self._row_blocks(dh), h - dh, :], rows[h - dh])
                prod = prod.unflatten(2, (2 * r + 1, C))
                for i, dw in enumerate(range(-r, r + 1)):
                    rhs = rhs - _shift_w(prod[:, :, i], -dw)
            block = self._row_block(log_diag, off_diag, h)
            u = torch.linalg.solve_triangular(block.mT, self._to_block(rhs), upper=False)
            rows.append(self._from_block(u, C))
        return torch.stack(rows, -2)
