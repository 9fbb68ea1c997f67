"""The linear strategy run over Mitogen connections: the project's default (ansible.cfg).

Mitogen keeps one Python interpreter per node for the whole play and sends it each module
in-process, instead of an SSH exec, a new interpreter and a module unpacked per task. An
unchanged `deploy.yml` on the lab takes about half as long (README, *Ansible*). The
task order, check mode and results are those of ansible-core's own `linear` strategy, which
stays one variable away: `ANSIBLE_STRATEGY=linear ansible-playbook ...`.

Mitogen ships its strategies inside its package, at a path that depends on the virtualenv
and the Python version; this file gives ansible.cfg a fixed place to name instead.
"""

from __future__ import annotations

import ansible_mitogen.loaders
import ansible_mitogen.strategy

_Linear = ansible_mitogen.loaders.strategy_loader.get("linear", class_only=True)


class StrategyModule(ansible_mitogen.strategy.StrategyMixin, _Linear):
    """ansible-core's linear strategy with Mitogen's connection and module execution."""
