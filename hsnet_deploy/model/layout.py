"""Which copy-saving layouts an export uses: each computes the same sums, and each is a choice per runtime."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ExportLayout:
    """The export-only layouts of the correlation and the learner (center_pivot.py, correlation.py).

    All on moves the fewest bytes (benchmarks/graph_cost.py) and is fastest on ONNX Runtime's CPU; a
    GPU runtime may prefer an off switch where cuDNN runs the plain form's convs faster than the copy costs.
    `single_bias` moves no layout: it drops a bias that ONNX Runtime's CUDA EP adds in a kernel of its own.
    """

    dilated_query_conv: bool = True  # conv1 as a Conv2d dilated by Hs'*Ws' on the 6D tensor, no transpose
    halo: bool = True  # C2's first block reads a correlation written with zero rows between support grids
    support_major_mixing: bool = True  # mixing blocks in (N, Hs, Ws, C, Hq, Wq), conv2 as one dense 1x1 conv
    single_bias: bool = True  # each center-pivot conv's two biases summed into conv2's: one bias pass per block

    @classmethod
    def parse(cls, text: str) -> ExportLayout:
        """'all', 'none', or a comma list of the switches to keep on (e.g. 'halo,support_major_mixing')."""
        names = [f.name for f in fields(cls)]
        text = text.strip()
        if not text:
            raise ValueError(f"empty; expected all, none or some of {', '.join(names)}")
        if text == "all":
            return cls()
        parts = [] if text == "none" else [part.strip().replace("-", "_") for part in text.split(",")]
        chosen = {part for part in parts if part}
        unknown = sorted(chosen - set(names))
        if unknown:
            raise ValueError(f"unknown layout switch {', '.join(unknown)}; "
                             f"expected all, none or some of {', '.join(names)}")
        return cls(**{name: name in chosen for name in names})

    def label(self) -> str:
        on = [f.name for f in fields(self) if getattr(self, f.name)]
        return "all" if len(on) == len(fields(self)) else (",".join(on) or "none")
