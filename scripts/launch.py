"""Preemption-safe `accelerate launch`: the entry point for containers, spot VMs and any shell that may send SIGTERM.

    python scripts/launch.py [--grace_seconds 25] [accelerate launch arguments] scripts/sft_qlora.py \\
        --config recipes/medgemma-4b/sft_qlora.yaml [--field value ...]

It runs `accelerate launch` with exactly those arguments as its child. SIGTERM / SIGINT / SIGHUP / SIGUSR1 to this
process, to a training process, or to all of them makes every training process commit a checkpoint (or stop before
the first step with nothing to save yet) and this process exit 143 within the grace period (default 25 s, or
$DISCHARGESUM_GRACE_SECONDS), where plain `accelerate launch` reports 1 or is gone before the commit. In a
container: `ENTRYPOINT ["python", "scripts/launch.py"]` (exec form, so this process is PID 1 and gets the signal).
Exit codes: 0 done, 143 preempted (rerun the same command to resume), 2 a bad option here, else the launcher's.
How and why: dischargesum/training/supervisor.py.
"""

from __future__ import annotations

import sys

from dischargesum.training.supervisor import main

if __name__ == "__main__":
    sys.exit(main())
