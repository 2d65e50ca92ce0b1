"""The MAXIMUS policy pack (`pulumi preview --policy-pack ../policy` in stacks/); rules: infra/policies.py."""

import sys
from pathlib import Path

from pulumi_policy import EnforcementLevel, PolicyPack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.policies import RESOURCE_POLICIES, STACK_POLICIES

PolicyPack(
    name="maximus-platform",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=[*RESOURCE_POLICIES, *STACK_POLICIES],
)
