"""torch.distributed glue: data-parallel training of the gradient-trained
estimators, used through the same ``fit``.

When a process group is initialised (``torchrun`` with ``gloo`` on CPUs or
``nccl`` on GPUs) and has more than one rank, ``KSparseAutoencoder.fit`` and
``LISTAEncoder.fit`` treat the rows given on each rank as that rank's shard of
one data set (the random stream of the fit is rank 0's on every rank). For the
autoencoder:

* every step takes ``batch_size // world`` rows on each rank (one more on the
  first ``batch_size % world`` ranks), so the global batch is ``batch_size``;
  all ranks run the same number of steps (a rank whose shard ran out takes an
  empty batch);
* the batch statistics the loss is normalised by (the FVU denominators, the
  batch's row count), the latents that fired (dead-latent counters), the
  BatchTopK selection threshold and running inference threshold, and the
  gradients are summed across ranks, so every rank takes the same optimiser
  step and keeps identical weights;
* the initialisation (input scale, decoder bias) uses the statistics of all
  shards.

With ``shuffle=False``, ranks where rank ``r`` holds ``X[r::world]`` reproduce
the single-process fit on ``X`` to float tolerance (initialisation sample
included, for up to 65536 rows).

``LISTAEncoder`` places the shards' rows in the global order
(:func:`global_rows`), draws its validation split over all rows, and reads each
global batch of the single-process order as the ranks' parts of it
(:class:`OrderedShard`, shuffled or not); the loss sums, row counts and
gradients of a step go in one all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..data.sources import RowSource, _to_tensor
from ..solvers.topk import SparsePairs

__all__ = ["Comm", "OrderedShard", "ShardSource", "global_rows", "world_comm", "is_writer"]

#: variants whose loss decomposes over the rows of the global batch
DATA_PARALLEL_VARIANTS = ("topk", "batchtopk", "matryoshka")


def world_comm():
    """A :class:`Comm` over the default process group when one is initialised with
    more than one rank, else None (single-process training)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Comm()


def is_writer():
    """True on rank 0 or without a process group: the process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Comm:
    """The sums and extrema across ranks that training needs (in place on copies)."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _wire(self, t):
        """A copy of ``t`` where the backend can send it (NCCL: on the GPU)."""
        if dist.get_backend(self.group) == "nccl" and t.device.type != "cuda":
            return t.cuda()
        return t.clone()

    def _reduce(self, t, op):
        buf = self._wire(t)
        dist.all_reduce(buf, op=op, group=self.group)
        return buf.to(t.device)

    def sum(self, t):
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t):
        return self._reduce(t, dist.ReduceOp.MAX)

    def min(self, t):
        return self._reduce(t, dist.ReduceOp.MIN)

    def broadcast(self, t):
        """Rank 0's ``t`` on every rank (a copy; same shape and dtype everywhere)."""
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        buf = self._wire(t)
        dist.broadcast(buf, src=src, group=self.group)
        return buf.to(t.device)

    def broadcast_generator(self, generator):
        """Give ``generator`` rank 0's state on every rank (in place)."""
        generator.set_state(self.broadcast(generator.get_state()))
        return generator

    def gather(self, values):
        """All ranks' ``(n,)`` tensors as one list (padded exchange: sizes differ)."""
        n = self._wire(torch.tensor([values.numel()]))
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        m = int(max(int(s) for s in sizes))
        buf = self._wire(values.new_zeros(m))
        buf[: values.numel()] = values
        out = [torch.zeros_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf, group=self.group)
        return [o[: int(s)].to(values.device) for o, s in zip(out, sizes, strict=True)]

    # ---------------------------------------------------------------- training
    def agree(self, name, error=None):
        """Raise on every rank when any rank hit ``error`` (an exception, None
        where all went well): that rank's own exception there, a ValueError
        naming the failed ranks on the others (a lone failing rank would leave
        the others waiting in their next collective)."""
        flag = self._wire(torch.tensor([int(error is not None)], dtype=torch.long))
        table = [torch.zeros_like(flag) for _ in range(self.world)]
        dist.all_gather(table, flag, group=self.group)
        failed = [r for r, t in enumerate(table) if int(t)]
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"{name}.fit failed on rank(s) {failed}; see that rank's error.")

    def run_together(self, name, fn, *args):
        """``fn(*args)`` on every rank; when it raises on any rank, every rank
        raises (see :meth:`agree`)."""
        out, err = None, None
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
        self.agree(name, err)
        return out

    def check_same(self, t, what, name):
        """ValueError on every rank unless ``t`` is the same tensor (shape and
        values) on all ranks."""
        shapes = self.gather(torch.tensor(t.shape, dtype=torch.long))
        if any(s.tolist() != shapes[0].tolist() for s in shapes):
            raise ValueError(
                f"{name}: the ranks were given {what} of different shapes "
                f"{[tuple(s.tolist()) for s in shapes]}; give every rank the same."
            )
        same = torch.equal(self.broadcast(t), t)
        self.agree(name, None if same else ValueError(
            f"{name}: rank {self.rank} was given other {what} than rank 0; every rank "
            "must train for the same ones."))

    def check_shards(self, n_rows, n_features, name, error=None):
        """Every rank learns every rank's row and feature counts; all raise the
        same ValueError when a rank has no rows, failed its own validation or
        disagrees on the feature count (a lone failing rank would leave the
        others waiting in their first collective)."""
        mine = self._wire(torch.tensor([int(n_rows), int(n_features), int(error is not None)],
                                       dtype=torch.long))
        table = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(table, mine, group=self.group)
        table = [[int(v) for v in t.cpu()] for t in table]
        if error is not None and table[self.rank][0] != 0:
            raise ValueError(error)  # this rank's own message, here
        failed = [r for r, t in enumerate(table) if t[2]]
        if failed:
            raise ValueError(
                f"{name}.fit failed on rank(s) {failed}"
                + (f": {error}" if error is not None else "; see that rank's error.")
            )
        empty = [r for r, t in enumerate(table) if t[0] == 0]
        if empty:
            raise ValueError(
                f"rank(s) {empty} of the {self.world} in the process group have no rows; "
                f"{name} trains on every rank's shard: give each rank at least one row "
                "(e.g. X[rank::world_size]) or start fewer ranks."
            )
        feats = sorted({t[1] for t in table})
        if len(feats) > 1:
            raise ValueError(
                f"the ranks' shards have different feature counts {feats}; every rank "
                f"must give {name} rows of the same width."
            )
        return [t[0] for t in table]

    def batch_variance(self, x):
        """``(batch_variance, n_rows)`` of the global batch
        (:func:`skdict.losses.batch_variance`), from one float64 sum of the
        ranks' row sums, squared norms and row counts."""
        with torch.no_grad():
            xd = x.double()
            s = self.sum(torch.cat([xd.sum(0), (xd * xd).sum().reshape(1),
                                    xd.new_tensor([x.shape[0]])]))
            total, sq, n = s[:-2], s[-2], s[-1]
            denom = sq - (total @ total) / n.clamp_min(1)
            denom = torch.maximum(denom, 1e-12 * sq + 1e-30).to(x.dtype)
            return denom, int(n)

    def batch_topk(self, pre, k, n_rows):
        """BatchTopK over the global batch: the ``k * n_rows`` largest entries of
        all ranks' pre-activations, as this rank's pairs."""
        b, K = pre.shape
        m = min(int(k) * int(n_rows), int(n_rows) * K)
        flat = pre.reshape(-1)
        local = torch.topk(flat, min(m, flat.numel()), sorted=False).values
        allv = torch.cat(self.gather(local))
        thr = torch.topk(allv, m, sorted=False).values.min()
        row, col = torch.nonzero(pre >= thr, as_tuple=True)
        return SparsePairs(row, col, b, K)

    def all_reduce_grads(self, params):
        """Sum the gradients of ``params`` across ranks (one flat buffer); a
        parameter without a gradient on every rank keeps none."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype,
                           device=grads[0].device)
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads] + [has]))
        off = 0
        for p in params:
            n = p.numel()
            # in the parameter's strides (the fused Adam step assumes them)
            p.grad = torch.empty_like(p).copy_(flat[off : off + n].view_as(p))
            off += n
        for p, h in zip(params, flat[off:].tolist(), strict=True):
            if h == 0:
                p.grad = None


def global_rows(counts, rank):
    """Global indices of rank ``rank``'s rows when the ranks' shards (of sizes
    ``counts``) interleave row by row: local row ``i`` of rank ``r`` is global
    row ``i * world + r`` when the shards are ``X[r::world]``; a rank whose
    shard ran out drops out of the rotation."""
    c = torch.as_tensor(list(counts), dtype=torch.long)
    i = torch.arange(int(c[rank]), dtype=torch.long)
    before = torch.minimum(c[None, :], i[:, None]).sum(1)  # rows of earlier rounds
    ahead = (c[None, :rank] > i[:, None]).sum(1)  # lower ranks in this round
    return before + ahead


class ShardSource(RowSource):
    """This rank's rows, read as its part of every global batch."""

    def __init__(self, source, comm, counts):
        self.source = source
        self.comm = comm
        self.counts = list(counts)
        self.n_samples = source.n_samples
        self.n_global = int(sum(self.counts))
        self.n_features = source.n_features
        self.dtype = source.dtype

    def local_batch_size(self, batch_size, rank=None):
        rank = self.comm.rank if rank is None else rank
        w = self.comm.world
        return max(1, int(batch_size) // w + (1 if rank < int(batch_size) % w else 0))

    def n_batches(self, batch_size):
        return max(-(-n // self.local_batch_size(batch_size, r))
                   for r, n in enumerate(self.counts))

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        steps = self.n_batches(batch_size)
        bs = self.local_batch_size(batch_size)
        done = 0
        for Xb in self.source.batches(bs, device=device, shuffle=shuffle, generator=generator,
                                      dtype=dtype):
            done += 1
            yield Xb
        tdtype = self._tdtype(dtype)
        for _ in range(steps - done):  # this shard ran out: take part with no rows
            yield torch.zeros((0, self.n_features), dtype=tdtype, device=device)

    def sample(self, n, *, generator, device, dtype=None):
        """This rank's part of the single-process sample: the global permutation
        is drawn as one process would, and global row ``g`` is taken as local row
        ``g // world`` of rank ``g % world`` (the ``X[r::world]`` layout)."""
        m = min(int(n), self.n_global)
        w, r = self.comm.world, self.comm.rank
        sel = torch.randperm(self.n_global, generator=generator)[:m]
        mine = sel[sel % w == r] // w
        mine = mine[mine < self.n_samples].sort().values
        src = self.source
        tdtype = self._tdtype(dtype)
        if mine.numel() == 0:
            return torch.zeros((0, self.n_features), dtype=tdtype, device=device)
        if src.is_dask:
            return _to_tensor(src.X[mine.numpy()].compute(), device, tdtype)
        return src._rows(mine if src.is_torch else mine.numpy(), device, tdtype)


class OrderedShard(RowSource):
    """This rank's rows of a global row order, read as its part of each global
    batch: the rows at positions ``pos`` (increasing) of a global order of
    ``n_global`` rows. Every rank yields a batch (possibly empty) at every step,
    and the global batches are those one process would read from the whole
    order, shuffled or not, given the same generator."""

    def __init__(self, X, pos, n_global, *, dtype):
        self.X = X
        self.pos = torch.as_tensor(pos, dtype=torch.long).cpu()
        self.n_samples = int(X.shape[0])
        self.n_global = int(n_global)
        self.n_features = int(X.shape[1])
        self.dtype = dtype

    def _take(self, positions, device, tdtype):
        """The local rows among global ``positions``, in their order."""
        inv = torch.full((self.n_global,), -1, dtype=torch.long)
        inv[self.pos] = torch.arange(self.n_samples)
        sel = inv[positions]
        sel = sel[sel >= 0].to(self.X.device)
        return self.X.index_select(0, sel).to(device=device, dtype=tdtype)

    def batches(self, batch_size, *, device, shuffle=False, generator=None, dtype=None):
        n, bs = self.n_global, max(1, int(batch_size))
        tdtype = self._tdtype(dtype)
        if not shuffle:
            for start in range(0, n, bs):
                lo, hi = torch.searchsorted(self.pos, torch.tensor([start, start + bs])).tolist()
                yield self.X[lo:hi].to(device=device, dtype=tdtype)
            return
        # the draws of ArraySource.batches over the global order
        if shuffle == "blocks":
            for b in torch.randperm(-(-n // bs), generator=generator).tolist():
                start, stop = b * bs, min(n, (b + 1) * bs)
                within = torch.randperm(stop - start, generator=generator)
                yield self._take(start + within, device, tdtype)
            return
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, bs):
            yield self._take(perm[start : start + bs].sort().values, device, tdtype)
