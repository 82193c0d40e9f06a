"""Which share of the clips this process encodes, under ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Ranks only need to meet at two
barriers (after rank 0 has prepared the cache folder, and after every rank has written its shards),
so a CPU ``gloo`` group is enough and no tensor ever travels between ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from cogvx.errors import ConfigError

# Ranks wait for the slowest one at the final barrier; a large dataset split unevenly can take hours.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group, so it also destroys it

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} from the environment do not fit together.")
        ranks = cls(rank, world, local)
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
                ranks.owns_group = True
        return ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False
