"""Watch one backward pass of a tiny GPT, op by op.

    python examples/backward_walkthrough.py
    python examples/backward_walkthrough.py --n-layers 4 --drop-rate 0 --text "Every effort moves you"

Runs one forward and one backward pass of a 2-layer GPT (embedding 16, 2 heads, GPT-2's
vocabulary, dropout 0.1, tied head, float64) on one sentence, and prints every op in the
order the backward runs it, from the loss to the embeddings: the shapes of the gradient it
receives (dout) and returns (dx), their norms, the gradients it adds into its parameters,
and the relative error of all of these against centred finite differences of
sum(op(x) * dout), for that op alone, at the very inputs and dout of this pass. Between
the rows, each block's residual additions show the stream's gradient passing each block
unchanged while the branches add their share. A few seconds on a CPU; exit code 1 if any
op's error exceeds --tol. docs/backward.md derives every one of these gradients.
This script is `numpygpt walkthrough`.
"""

import os
import sys

# run from a checkout without installing: make the repository importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from numpygpt.walkthrough import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
