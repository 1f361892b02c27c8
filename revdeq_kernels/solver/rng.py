"""RngTape: the RNG states a stochastic f used in the forward, replayed by the backward."""

import contextlib

import torch


class RngTape:
    """The RNG states before each evaluation of ``f`` in the forward, replayed in the backward.

    Covers the CPU generator and the CUDA generators of the devices the solve's tensors live on, as
    torch.utils.checkpoint does. When the first evaluation drew no random numbers, f is taken to be
    deterministic and nothing more is recorded (a snapshot copies the CPU generator's 5 KB: two per step,
    kept until the forward ends); :meth:`finish` then checks that no later evaluation drew any either, and
    raises if one did (its randomness could not be replayed), so the assumption is never silently wrong.

    Example:
        >>> tape = RngTape([x]); tape.record(); out = f(z, x); tape.finish()
        >>> with tape.forked(): tape.replay(0); out_again = f(z, x)
    """

    def __init__(self, tensors, caller: str = "reversible_fixed_point"):
        """``tensors``: whose CUDA devices' generators to cover; None records nothing (no backward)."""
        self._cuda_devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                                     for t in tensors or () if t.is_cuda})
        self._states = [] if tensors is not None else None
        self._deterministic = False  # the first evaluation drew nothing: record no more
        self._caller = caller

    def _snapshot(self):
        return torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in self._cuda_devices)

    def _restore(self, snapshot) -> None:
        cpu, cuda = snapshot
        torch.set_rng_state(cpu)
        for device, state in zip(self._cuda_devices, cuda):
            torch.cuda.set_rng_state(state, device)

    @staticmethod
    def _same(a, b) -> bool:
        return torch.equal(a[0], b[0]) and all(map(torch.equal, a[1], b[1]))

    def record(self) -> None:
        if self._states is None or self._deterministic:
            return
        snapshot = self._snapshot()
        if len(self._states) == 1 and self._same(self._states[0], snapshot):
            self._deterministic = True  # the first evaluation drew nothing
            return
        self._states.append(snapshot)

    def finish(self) -> None:
        if self._states:
            if not self._same(self._states[0], self._snapshot()):
                if self._deterministic:
                    raise RuntimeError(
                        f"{self._caller}: f drew random numbers in a later evaluation but not in its first "
                        "(f(z0)); the reversible backward replays the randomness of every evaluation, which it "
                        "records only for an f that draws from its first call on (dropout in training mode does). "
                        "Make f draw the same way at every call, or keep random draws out of f")
                return
            self._states = None  # nothing drew random numbers: nothing to replay

    @property
    def stochastic(self) -> bool:
        return bool(self._states)

    def replay(self, evaluation: int) -> None:
        if self._states:
            self._restore(self._states[evaluation])

    @contextlib.contextmanager
    def forked(self):
        """Run the block with replayed states, then put the caller's RNG states back."""
        if not self._states:
            yield
            return
        before = self._snapshot()
        try:
            yield
        finally:
            self._restore(before)
