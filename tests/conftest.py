"""Test-wide settings: a quick hypothesis profile by default (HYPOTHESIS_PROFILE=thorough for more)."""

import os
import tempfile

import torch
from hypothesis import HealthCheck, settings

# "ci" draws the same examples on every run, so a suite that passed here passes in CI; "thorough" explores.
settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(2)
# Reports predict latency from the profile `fxreduce calibrate` wrote; tests must not depend on one this
# machine happens to have, so they start without (tests that need one write their own).
os.environ["FXREDUCE_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxreduce-test-cache-")
