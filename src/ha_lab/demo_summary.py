"""What `make demo` prints at the end: where every node, network and service is."""

from __future__ import annotations

import sys
from typing import Any

from .lab import Lab
from .observe import module_states


def render(description: dict[str, Any]) -> str:
    lines = ["", "hapair demo lab", "==============="]
    for node in description["nodes"]:
        state = "running" if node["running"] else "DOWN"
        addresses = "  ".join(f"{net} {addr}" for net, addr in node["addresses"].items())
        lines.append(f"{node['name']:<6} {state:<8} {addresses}")
        lines.append(f"       {node['ssh']}")
    lines.append(f"client  {description['client']['lan']}  (ha-lab client -- CMD)")
    lines.append(f"witness {description['witness']['lan']}  (the site router)")
    vips: dict[str, str] = {}
    for node in description["nodes"]:
        if not node["running"]:
            continue
        for module in module_states(node["name"]).values():
            lines.append(
                f"{node['name']:<6} module {module.get('module')}: {module.get('state')}"
                f" (vip {module.get('vip') or '-'})"
            )
            if module.get("vip"):
                vips[str(module["module"])] = str(module["vip"]).split("/")[0]
    for name, vip in sorted(vips.items()):
        lines.append(f"reach {name}: ha-lab client -- curl -s http://{vip}:8080/health")
    lines.append(f"inventory: {description['inventory']}")
    lines.append("tear down: ha-lab down")
    return "\n".join(lines)


def main() -> int:
    print(render(Lab().describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
