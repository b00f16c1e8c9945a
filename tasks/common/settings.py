"""The run settings a report names: what a run folder recorded about itself (the generation
backend, the CPU dtype; :mod:`flows.run_record`), each with the reason it was chosen."""

from __future__ import annotations


def settings_lines(settings: dict[str, dict[str, str]]) -> list[str]:
    """Markdown lines naming each recorded setting, its value and why (empty when none)."""
    if not settings:
        return []
    parts = [f"{k.replace('_', ' ')} `{v['value']}` ({v['reason']})" for k, v in settings.items()]
    return ["Run settings, kept across resumes: " + "; ".join(parts) + ".", ""]
