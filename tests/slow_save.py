"""``python tests/slow_save.py STEP SECONDS SCRIPT ARGS...``: run SCRIPT (e.g. train.py) with the save of
step STEP held back SECONDS seconds in the background, so that a test can kill the process (or the
storage server) while that asynchronous save is in flight: its temporary directory exists, training goes on.

The delay is one more commit future of orbax's JSON handler (the ``meta`` item, whose content holds the
step), through orbax's public handler and future classes."""

import asyncio
import runpy
import sys

import orbax.checkpoint as ocp


def hold_save(step: int, seconds: float) -> None:
    original = ocp.JsonCheckpointHandler.async_save

    async def async_save(self, directory, item=None, args=None):
        futures = list(await original(self, directory, item, args) or [])
        content = args.item if args is not None else item
        if isinstance(content, dict) and content.get("step") == step:
            futures.append(ocp.future.CommitFutureAwaitingContractedSignals(asyncio.sleep(seconds),
                                                                            name="test_hold_save"))
        return futures

    ocp.JsonCheckpointHandler.async_save = async_save


if __name__ == "__main__":
    step, seconds, script, *args = sys.argv[1:]
    hold_save(int(step), float(seconds))
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
