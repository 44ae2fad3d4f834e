"""``torchrun`` entry of the elastic-restart test: ``natgrad train``, with one worker dying.

    NATGRAD_TEST_KILL_STEP=K python -m torch.distributed.run ... elastic_worker.py ARGS

runs ``natgrad train ARGS`` on each rank; on the first attempt only
(``TORCHELASTIC_RESTART_COUNT`` = 0), rank 1 exits abruptly (``os._exit``, no clean-up,
like a lost machine) right after step K. torchrun then restarts every rank, and
``natgrad train`` resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import sys

from natgrad.cli import train
from natgrad.cli.main import build_parser

KILLED_RANK = "1"
EXIT_STATUS = 17


def die_at(step: int) -> None:
    """The ``on_step`` hook: end this process after ``step`` steps on the first attempt."""

    def on_step(done: int) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if done == step and first_attempt and os.environ.get("RANK") == KILLED_RANK:
            sys.stdout.flush()
            marker = os.environ.get("NATGRAD_TEST_KILL_MARKER")
            if marker:  # the test's evidence that the kill happened (torchrun may report
                with open(marker, "w") as file:  # the surviving rank's abort first)
                    file.write(str(done))
            os._exit(EXIT_STATUS)

    return on_step


if __name__ == "__main__":
    parser = build_parser()
    args = parser.parse_args(["train", *sys.argv[1:]])
    sys.exit(train.run(args, args.subparser, die_at(int(os.environ["NATGRAD_TEST_KILL_STEP"]))))
