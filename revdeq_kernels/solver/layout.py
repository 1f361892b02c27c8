"""StateLayout: what a RevDEQ state is made of (one tensor, or a tuple of tensors) and how it is stored.

A multiscale DEQ keeps its state as several tensors of different shapes (one per resolution) and
its ``f`` returns as many. The solver treats such a *tuple state* as one state: the fused ops update
all members with one multi-tensor call, the residual sums over all of them, and the states live in
one flat buffer per state (``y``, ``z`` and the adjoints ``hy``, ``hz``), each member a contiguous
view into it, so anything done to a whole state at once (a cast for ``f``, the start, the drift) is
one op on one allocation. A single-tensor state is a buffer of its own shape, exactly as before.
"""

import math

import torch


class StateLayout:
    """The members of a state: their shapes, the dtype ``f`` sees for each, and the container.

    Args:
        kind: ``torch.Tensor`` for a single-tensor state, else the container (``tuple`` or ``list``)
            the caller passed z0 in; ``f`` receives its state and the caller its result in it.
        shapes: one shape per member (exactly one for a single tensor).
        compute_dtypes: the dtype ``f`` sees, and returns, for each member.
        device: the one device of every member.

    A *buffer* holds one whole state in one dtype: a tensor of the state's shape for a single
    tensor, a 1-D tensor of all members' elements (member i at ``offsets[i]:offsets[i + 1]``) for a
    tuple. *Members* are what the ops take: the buffer itself, or a tuple of views into it.

    Example:
        >>> layout = StateLayout(tuple, [(4, 8), (2, 3)], [torch.float32] * 2, torch.device("cpu"))
        >>> buf = layout.zeros(torch.float64); buf.shape, [m.shape for m in layout.members(buf)]
        (torch.Size([38]), [torch.Size([4, 8]), torch.Size([2, 3])])
    """

    def __init__(self, kind, shapes, compute_dtypes, device):
        self.kind = kind
        self.is_tuple = kind is not torch.Tensor  # read several times per step: an attribute, not a property
        self.shapes = [tuple(s) for s in shapes]
        self.compute_dtypes = list(compute_dtypes)
        self.device = torch.device(device)
        self.offsets = [0]
        for shape in self.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(shape))
        dtypes = set(self.compute_dtypes)
        self.common_dtype = dtypes.pop() if len(dtypes) == 1 else None  # None: members differ

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def describe(self) -> str:
        """The state for messages: ``a state of shape (3, 6)``, ``a tuple state of shapes (3, 6), (2, 4)``."""
        if not self.is_tuple:
            return f"a state of shape {self.shapes[0]}"
        return f"a tuple state of shapes {', '.join(map(str, self.shapes))}"

    # Buffers and their members.
    @property
    def buffer_shape(self) -> tuple:
        return (self.numel,) if self.is_tuple else self.shapes[0]

    def zeros(self, dtype) -> torch.Tensor:
        return torch.zeros(self.buffer_shape, dtype=dtype, device=self.device)

    def members(self, buffer: torch.Tensor):
        """The buffer as the ops take it: itself (a single tensor), or a tuple of views (a tuple)."""
        if not self.is_tuple:
            return buffer
        return tuple(buffer[a:b].view(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes))

    def split(self, value) -> tuple:
        """A structured value (a tensor, or a sequence of members) as a tuple of members."""
        return tuple(value) if self.is_tuple else (value,)

    def join(self, members):
        """The inverse of :meth:`split` for what the ops and the solver pass around (a tuple, not a list)."""
        return tuple(members) if self.is_tuple else members[0]

    def pack(self, members):
        """What ``f`` and the caller see: the members in the caller's container (a tensor stays one)."""
        return self.kind(members) if self.is_tuple else members

    def detach(self, value):
        """A structured value with every member detached (the fused ops refuse tensors that require grad)."""
        return self.join([v.detach() for v in self.split(value)])

    def start_buffer(self, start, dtype) -> torch.Tensor:
        """A new buffer of ``dtype`` holding a start (a structured value like z0; None means zeros)."""
        return self.zeros(dtype) if start is None else self.gather(start, dtype)

    def leaves(self, value):
        """A structured value with every member a fresh leaf that requires grad (for one vector-Jacobian
        product)."""
        return self.join([v.detach().requires_grad_() for v in self.split(value)])

    def kept_buffer(self, kept: dict, key, dtype) -> tuple:
        """``(buffer, its members)`` of ``dtype`` kept in ``kept[key]``, allocated on the first call only: where
        the solver writes a cast at every step (f's input, the adjoints for autograd) without allocating."""
        entry = kept.get(key)
        if entry is None:
            buffer = torch.empty(self.buffer_shape, dtype=dtype, device=self.device)
            entry = kept[key] = (buffer, self.members(buffer))
        return entry

    def gather(self, value, dtype) -> torch.Tensor:
        """A new buffer of ``dtype`` holding a structured value (one copy per member)."""
        buffer = torch.empty(self.buffer_shape, dtype=dtype, device=self.device)  # the members cover it
        for member, v in zip(self.split(self.members(buffer)), self.split(value)):
            member.copy_(v.detach())
        return buffer

    def flat(self, value) -> torch.Tensor:
        """A structured value as one detached tensor: itself for a single tensor, else the members
        flattened and concatenated (one copy, in the most precise of their dtypes, which is exact)."""
        if not self.is_tuple:
            return value.detach()
        return torch.cat([v.detach().reshape(-1) for v in value])

    def cast(self, buffer: torch.Tensor, dtypes=None):
        """The members of ``buffer`` in ``dtypes`` (default: the compute dtypes), detached.

        One cast of the whole buffer when the members share a dtype (an alias, no copy, when it is
        already the buffer's), else one cast per member."""
        dtypes = self.compute_dtypes if dtypes is None else list(dtypes)
        buffer = buffer.detach()
        if len(set(dtypes)) == 1:
            return self.members(buffer.to(dtypes[0]))
        return self.join([m.to(d) for m, d in zip(self.split(self.members(buffer)), dtypes)])
