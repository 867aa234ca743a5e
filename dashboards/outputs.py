"""Where the generated dashboards and rules live, and how they are written.

The outputs are committed; ``wantel dashboards build`` (:func:`build_all`) is how they change.
It writes ``dashboards/generated/*.json`` and ``dashboards/alerts/wantel.yml`` (or both into ``--out
DIR``), byte for byte the same on every run, so a diff shows exactly what a code change did.
Files are replaced atomically (a reader such as Grafana's provisioner never sees half a file),
by :func:`telemetry.files.write_atomic`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from telemetry.files import write_atomic as replace_file

if TYPE_CHECKING:
    from dashboards.rules import RuleParams
    from dashboards.specs import BuildOptions

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PACKAGE_DIR / "generated"
DEFAULT_RULES = PACKAGE_DIR / "alerts" / "wantel.yml"


def write_atomic(path: Path, text: str) -> bool:
    """Replace ``path`` with ``text`` unless it already holds exactly that; True if written."""
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return False
    replace_file(path, data)
    return True


def build_all(out: Path | None = None, *, params: RuleParams | None = None,
              options: BuildOptions | None = None) -> list[Path]:
    """Write every dashboard (for ``options``) and the rule file (for ``params``); returns
    the paths that changed."""
    from dashboards.build import render_all
    from dashboards.rules import render_rules

    dash_dir = out or DEFAULT_OUT
    rules_path = (out / DEFAULT_RULES.name) if out else DEFAULT_RULES
    outputs = {dash_dir / name: text for name, text in render_all(options).items()}
    outputs[rules_path] = render_rules(params)
    return [path for path, text in outputs.items() if write_atomic(path, text)]
