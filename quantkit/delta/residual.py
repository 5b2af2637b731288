"""Error feedback across updates (`--residual STATE`), as in Deep Gradient Compression and
EF-SGD: what a lossy update did not send is kept and added to the next delta,

    d_t = (NEW_t - BASE_t) + r_{t-1}        sent: C(d_t)        r_t = d_t - decode(C(d_t))

so after T rounds the receiver is off by r_T alone instead of the sum of every round's error.
It fits deltas whose BASE the receiver holds exactly (a FedAvg global model: clients send
compressed local updates, the server sums them). The state is an .npz of float32 arrays keyed by
tensor name, written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import InputError
from quantkit.output import Outputs


def load(path: Path | None, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The carried-over residual per lossy tensor; zeros when the state file does not exist yet."""
    if path is None or not Path(path).exists():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"residual state {path} is not readable ({e}); delete it to start over") from None
    for name, r in state.items():
        a = arrays.get(name)
        if a is None or a.shape != r.shape:
            raise InputError(f"residual state {path} holds tensor '{name}' that does not match the models "
                             "(another architecture?); delete it to start over")
    return state


def save(path: Path, residuals: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: v.astype(np.float32) for k, v in residuals.items()}
    np.savez(buf, **arrays)
    with Outputs(force=True) as out:  # the state is ours to replace each round
        out.stage_bytes(buf.getvalue(), Path(path))
        out.commit()
