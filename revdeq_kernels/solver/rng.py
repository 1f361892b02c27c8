"""RngTape: the RNG states a stochastic f used in the forward, replayed by the backward."""

import contextlib

import torch


class RngTape:
    """The RNG states before each evaluation of ``f`` in the forward, replayed in the backward.

    Covers the CPU generator and the CUDA generators of the devices the solve's tensors live on, as
    torch.utils.checkpoint does. When the whole forward consumed no randomness, :meth:`finish` drops
    the recorded states, so a deterministic ``f`` costs no memory per step.

    Example:
        >>> tape = RngTape([x]); tape.record(); out = f(z, x); tape.finish()
        >>> with tape.forked(): tape.replay(0); out_again = f(z, x)
    """

    def __init__(self, tensors):
        """``tensors``: whose CUDA devices' generators to cover; None records nothing (no backward)."""
        self._cuda_devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                                     for t in tensors or () if t.is_cuda})
        self._states = [] if tensors is not None else None

    def _snapshot(self):
        return torch.get_rng_state(), tuple(torch.cuda.get_rng_state(d) for d in self._cuda_devices)

    def _restore(self, snapshot) -> None:
        cpu, cuda = snapshot
        torch.set_rng_state(cpu)
        for device, state in zip(self._cuda_devices, cuda):
            torch.cuda.set_rng_state(state, device)

    def record(self) -> None:
        if self._states is not None:
            self._states.append(self._snapshot())

    def finish(self) -> None:
        if self._states:
            first, now = self._states[0], self._snapshot()
            if torch.equal(first[0], now[0]) and all(map(torch.equal, first[1], now[1])):
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
