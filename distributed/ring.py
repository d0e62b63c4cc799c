"""Item shards passed around a ring of ranks (the grid layout's DSGD and fill).

Rank r sends to rank (r − 1) mod W and receives from rank (r + 1) mod W, so after s shifts
rank r holds what rank (r + s) mod W held at the start, and after W shifts everything is
home again. Shards may have different shapes on different ranks (ragged blocks): each shift
first exchanges one small int64 header with every tensor's shape, then the tensors
themselves, all as one batch of point-to-point operations (``batch_isend_irecv``; gloo on
CPU, nccl on CUDA). Every rank must pass the same keys with the same dtypes and number of
dimensions. :meth:`Ring.start_shift` posts a shift and returns at once, so a block that is
only read (the fill, an evaluation) is scored while it travels on; DSGD, which writes the
block, shifts after its sub-epoch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Ring:
    """The ring of ``world``'s ranks (a :class:`~svdfill.distributed.world.World`: rank,
    world_size, and ``comm_device`` for a multi-process world).

    bytes_sent: payload bytes this rank has sent (the tensors' data); header_bytes_sent:
    the shape headers on top of it (8 bytes per dimension per tensor per shift); shifts: how
    many shifts ran. All zero at W = 1, where :meth:`shift` is the identity.
    """

    def __init__(self, world):
        self.rank = int(world.rank)
        self.size = int(world.world_size)
        self.comm_device = getattr(world, "comm_device", torch.device("cpu"))
        self.bytes_sent = 0
        self.header_bytes_sent = 0
        self.shifts = 0

    @property
    def send_to(self) -> int:
        return (self.rank - 1) % self.size

    @property
    def recv_from(self) -> int:
        return (self.rank + 1) % self.size

    def shift(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Send ``tensors`` to rank r − 1 and return what rank r + 1 sent, on the devices and
        with the dtypes of ``tensors``' own entries (same keys). Collective: every rank calls
        it with the same keys. Identity (the same objects) at W = 1."""
        return self.start_shift(tensors).wait()

    def start_shift(self, tensors: dict[str, torch.Tensor]) -> "PendingShift":
        """:meth:`shift` that returns once the transfers are posted (the shape header has
        been exchanged): compute on ``tensors`` meanwhile — read only, they are being sent —
        and call ``.wait()`` for what rank r + 1 sent."""
        if self.size == 1:
            return PendingShift([], tensors, {}, [])
        keys = sorted(tensors)
        header = torch.tensor([s for k in keys for s in tensors[k].shape] or [0],
                              dtype=torch.int64, device=self.comm_device)
        got = torch.empty_like(header)
        for w in self._post([header], [got]):
            w.wait()
        self.header_bytes_sent += header.numel() * header.element_size()
        dims = got.tolist()
        send, recv, out = [], [], {}
        pos = 0
        for k in keys:
            t = tensors[k]
            shape = tuple(dims[pos:pos + t.dim()])
            pos += t.dim()
            r = torch.empty(shape, dtype=t.dtype, device=self.comm_device)
            out[k] = r
            c = t.detach()
            c = (c if c.device == self.comm_device else c.to(self.comm_device)).contiguous()
            # empty shards send nothing: both ends know the sizes from the header
            if c.numel():
                send.append(c)
                self.bytes_sent += c.numel() * c.element_size()
            if r.numel():
                recv.append(r)
        works = self._post(send, recv)
        self.shifts += 1
        return PendingShift(works, out, {k: tensors[k].device for k in keys}, send)

    def _post(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> list:
        ops = [dist.P2POp(dist.isend, t, self.send_to) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.recv_from) for t in recv]
        return dist.batch_isend_irecv(ops) if ops else []


class PendingShift:
    """A shift in flight (:meth:`Ring.start_shift`): ``wait()`` returns the received
    tensors on the senders' devices. Holds the send buffers until then."""

    def __init__(self, works: list, out: dict[str, torch.Tensor],
                 devices: dict[str, torch.device], send: list[torch.Tensor]):
        self._works, self._out, self._devices, self._send = works, out, devices, send

    def wait(self) -> dict[str, torch.Tensor]:
        for w in self._works:
            w.wait()
        self._works, self._send = [], []
        if not self._devices:  # W = 1: the tensors themselves
            return self._out
        return {k: (v if v.device == self._devices[k] else v.to(self._devices[k]))
                for k, v in self._out.items()}
