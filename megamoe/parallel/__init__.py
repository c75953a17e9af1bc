"""Everything about ranks: start-up, topology, random streams (and, as they land, TP/EP/DP/PP)."""
from megamoe.parallel.random import generator_for, get_rng_state, set_rng_state, set_seed
from megamoe.parallel.topology import LaunchEnv, Topology, destroy_distributed, detect_launch_env, init_distributed

__all__ = ["LaunchEnv", "Topology", "destroy_distributed", "detect_launch_env", "init_distributed",
           "generator_for", "get_rng_state", "set_rng_state", "set_seed"]
