"""Names of the workflow kit that the CLI needs to build its options, without importing the kit."""

from __future__ import annotations

ROLES = ("spec-author", "architect-reviewer", "test-strategist", "scrum-master", "navigator", "driver")
#: artifact -> the role that owns it
ARTIFACTS = {"spec": "spec-author", "architecture": "architect-reviewer", "test-list": "test-strategist",
             "plan": "scrum-master"}
CI_WAIT = 1800.0  # how long `flow ci` waits for a runner to take and finish its run
