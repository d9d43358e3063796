"""Device-side twin of `Featurizer.rank_batch`: one host->device copy, then batched torch ops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grinfer.data.types import ItemCatalog
from grinfer.features.batch import EventTokens, MTGRBatch
from grinfer.features.featurizer import FeatureRequest
from grinfer.ops.groups import time_bucket


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 (index_select: several times faster than advanced indexing on CPU)."""
    return x.index_select(0, index)


def upload(device: torch.device, parts: list[list[np.ndarray]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Concatenate each part's arrays into one host buffer (pinned, from PyTorch's caching host allocator,
    on CUDA), copy it to the device once (asynchronously), and return one flat device tensor per part."""
    sizes = [sum(np.size(x) for x in arrays) for arrays in parts]
    buf = torch.empty(sum(sizes), dtype=dtype, pin_memory=device.type == "cuda")
    host, start = buf.numpy(), 0
    for arrays, size in zip(parts, sizes):
        out = host[start:start + size]
        np.concatenate(arrays, out=out.reshape(-1, *np.shape(arrays[0])[1:]), casting="unsafe")
        start += size
    return list(buf.to(device, non_blocking=True).split(sizes))


@dataclass
class RawBatch:
    """A batch's raw events on the device (one upload) and the sizes the host knows."""

    offsets: torch.Tensor  # [4, B + 1] context (request order), S, R, candidates
    runs: torch.Tensor  # [4, 2B] S then R runs: length, input - output index, user, the user's first event
    last: torch.Tensor  # [B] each user's last event in [timestamps | request_ts]
    request_ts: torch.Tensor
    profile: torch.Tensor
    items: torch.Tensor
    stamps: torch.Tensor
    ratings: torch.Tensor
    candidates: torch.Tensor
    num_requests: int
    profile_width: int
    num_context: int
    num_static: int
    num_candidates: int
    labels: torch.Tensor | None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.offsets, self.runs, self.last, self.request_ts, self.profile, self.items, self.stamps,
                self.ratings, self.candidates)

    def sizes(self) -> tuple[int, int, int, int, int]:
        return self.num_requests, self.profile_width, self.num_context, self.num_static, self.num_candidates


class DeviceFeaturizer:
    """Builds `MTGRBatch`es on `device`, equal to `Featurizer(catalog, num_time_buckets).rank_batch(r).to(device)`.

    The host only concatenates the raw arrays (once per field) into one int64 buffer, pinned on CUDA;
    gathers, gaps, the S/R split and the cross features are batched torch ops without host syncs.
    """

    def __init__(self, catalog: ItemCatalog, num_time_buckets: int, device):
        self.device = torch.device(device)
        self.genres = torch.as_tensor(catalog.genres.astype(np.float32), device=self.device)
        self.years = torch.as_tensor(catalog.year_bucket.astype(np.int64), device=self.device)
        self.num_years = int(catalog.year_bucket.max()) + 1
        self.num_rows = len(catalog.genres)  # item ids are < num_rows: per-user keys are user * num_rows + item
        self.num_time_buckets = num_time_buckets

    def rank_batch(self, requests: list[FeatureRequest]) -> MTGRBatch:
        """One jagged ranking batch, built on the device."""
        return self.build(self.prepare(requests))

    def prepare(self, requests: list[FeatureRequest]) -> RawBatch:
        """The host's share: sizes and run tables from the requests, every raw array uploaded at once."""
        if not requests:
            raise ValueError("rank_batch: no requests")
        b, ctxs = len(requests), [r.context for r in requests]
        ctx_len = np.array([len(c.items) for c in ctxs], np.int64)
        # S length = len(items[:num_static]), as the numpy featurizer slices
        static = np.array([slice(c.num_static).indices(n)[1] for c, n in zip(ctxs, ctx_len)], np.int64)
        cand_len = np.array([len(r.candidates) for r in requests], np.int64)
        offsets = np.zeros((4, b + 1), np.int64)  # context (request order), S, R, candidates
        np.cumsum(np.stack([ctx_len, static, ctx_len - static, cand_len]), axis=1, out=offsets[:, 1:])
        n_ctx, n_s, n_cand = int(offsets[0, -1]), int(offsets[1, -1]), int(offsets[3, -1])
        width = len(ctxs[0].profile)
        if any(len(c.profile) != width for c in ctxs):
            raise ValueError("rank_batch: profiles of different lengths")
        # the output context is 2B runs, S of every user then R of every user, each a shifted run of the input
        first, users = offsets[0, :-1], np.arange(b)
        runs = np.stack([np.r_[static, ctx_len - static],  # length
                         np.r_[first - offsets[1, :-1], first + static - n_s - offsets[2, :-1]],  # input - output index
                         np.r_[users, users], np.r_[first, first]])  # user, the user's first event
        last = np.where(ctx_len > 0, offsets[0, 1:] - 1, n_ctx + users)  # index in [stamps | request_ts]
        tensors = upload(self.device, [
            [offsets.ravel()], [runs.ravel()], [last], [np.array([r.request_ts for r in requests])],
            [c.profile for c in ctxs], [c.items for c in ctxs], [c.timestamps for c in ctxs],
            [c.ratings for c in ctxs], [r.candidates for r in requests]], torch.int64)
        return RawBatch(*tensors, b, width, n_ctx, n_s, n_cand, self._labels(requests))  # pyright: ignore[reportCallIssue]

    def build(self, raw: RawBatch) -> MTGRBatch:
        """The device's share: tokens, gaps and cross features with batched ops (no host sync)."""
        batch = self.build_from(*raw.tensors(), *raw.sizes())
        batch.labels = raw.labels
        return batch

    def build_from(self, offsets, runs, last, request_ts, profile, items, stamps, ratings, cands,
                   b: int, width: int, n_ctx: int, n_s: int, n_cand: int) -> MTGRBatch:
        """`build` on RawBatch's tensors and sizes as plain arguments, so that torch.compile(dynamic=True)
        treats the sizes as symbols (object attributes would be specialised: a recompile per shape)."""
        ctx_off, s_off, r_off, c_off = offsets.view(4, b + 1)
        run_len, run_shift, run_user, run_first = runs.view(4, 2 * b)
        dev = stamps.device

        # context tokens in output order: src = index in the input context, seg = user, prev = previous timestamp
        run = torch.repeat_interleave(torch.arange(2 * b, device=dev), run_len, output_size=n_ctx)
        src = torch.arange(n_ctx, device=dev) + take(run_shift, run)
        seg = take(run_user, run)
        ts = take(stamps, src)
        prev = torch.where(src == take(run_first, run), ts, take(stamps, (src - 1).clamp(min=0)))
        # candidates: at request_ts, after the user's last event (request_ts itself without events)
        seg_c = torch.repeat_interleave(torch.arange(b, device=dev), c_off.diff(), output_size=n_cand)
        c_ts, c_prev = take(request_ts, seg_c), take(take(torch.cat([stamps, request_ts]), last), seg_c)
        gaps = time_bucket(torch.cat([ts - prev, c_ts - c_prev]), self.num_time_buckets).split([n_ctx, n_cand])

        context = self._tokens(take(items, src), take(ratings, src), ts, gaps[0])
        candidates = self._tokens(cands, torch.zeros_like(cands), c_ts, gaps[1])
        parts = {k: v.split([n_s, n_ctx - n_s]) for k, v in context.items()}  # split: no guard on n_s's value
        history, realtime = ({k: v[i] for k, v in parts.items()} for i in (0, 1))
        return MTGRBatch(
            profile=profile.view(b, width),
            history=EventTokens(s_off, **history),
            realtime=EventTokens(r_off, **realtime),
            candidates=EventTokens(c_off, **candidates),
            cross=self._cross(b, ctx_off.diff(), seg, context, seg_c, candidates, n_ctx),
            request_ts=request_ts,
        )

    def _tokens(self, items, actions, stamps, gaps) -> dict[str, torch.Tensor]:
        return {"items": items, "genres": take(self.genres, items), "years": take(self.years, items),
                "actions": actions, "timestamps": stamps, "gaps": gaps}

    def _cross(self, b: int, lengths, seg, ctx: dict, seg_c, cand: dict, n_ctx: int) -> torch.Tensor:
        """[N_c, 4] `Featurizer.cross_features` of every request, from per-user sums (index_add_ over `seg`).

        No matmuls: they could run in TF32 (the engine allows it), far from the numpy float32 values.
        """
        genres, cand_genres = ctx["genres"], cand["genres"]
        n = lengths.clamp(min=1).to(torch.float32)  # users without events have all-zero sums, so all-zero features
        centred = (ctx["actions"].to(torch.float32) - 3.0) / 2.0
        counts = genres.new_zeros(b, genres.shape[1]).index_add_(0, seg, genres)
        rating = genres.new_zeros(b, genres.shape[1]).index_add_(0, seg, genres * centred[:, None])
        per_user = torch.stack([counts / n[:, None], rating / counts.clamp(min=1)], 1)  # [B, 2, G]
        affinity = (take(per_user, seg_c) * cand_genres[:, None]).sum(2) / cand_genres.sum(1, keepdim=True).clamp(1)
        era = genres.new_zeros(b * self.num_years).index_add_(0, seg * self.num_years + ctx["years"],
                                                              genres.new_ones(len(seg)))
        same_era = take(era, seg_c * self.num_years + cand["years"]) / take(n, seg_c)
        keys, cand_keys = seg * self.num_rows + ctx["items"], seg_c * self.num_rows + cand["items"]
        if n_ctx:  # sort + searchsorted: torch.isin would sync with the host (unique) on CUDA
            keys = keys.sort().values
            seen = take(keys, torch.searchsorted(keys, cand_keys).clamp(max=n_ctx - 1)) == cand_keys
        else:
            seen = torch.zeros_like(cand_keys, dtype=torch.bool)
        return torch.cat([affinity, same_era[:, None], seen[:, None].to(torch.float32)], 1)

    def _labels(self, requests: list[FeatureRequest]) -> torch.Tensor | None:
        """[N_c, num_tasks] float32 when every request has labels, else None (as the numpy featurizer)."""
        labels = [np.asarray(r.labels, np.float32).reshape(len(r.candidates), -1)
                  for r in requests if r.labels is not None]
        if len(labels) != len(requests):
            return None
        return upload(self.device, [labels], torch.float32)[0].view(sum(map(len, labels)), labels[0].shape[1])
