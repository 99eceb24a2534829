"""License families of the Hub's license ids: what a model's terms allow, in four words."""

from __future__ import annotations

from typing import Optional

# Hub license ids (https://huggingface.co/docs/hub/repositories-licenses) by what they allow.
LICENSE_FAMILIES: dict[str, str] = {
    **dict.fromkeys([
        "apache-2.0", "mit", "bsd", "bsd-2-clause", "bsd-3-clause", "bsd-3-clause-clear", "bsl-1.0", "isc",
        "zlib", "unlicense", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
        "cc-by-sa-4.0", "afl-3.0", "artistic-2.0", "ecl-2.0", "epl-1.0", "epl-2.0", "gpl", "gpl-2.0", "gpl-3.0",
        "lgpl", "lgpl-2.1", "lgpl-3.0", "lgpl-lr", "agpl-3.0", "mpl-2.0", "wtfpl", "postgresql", "ncsa", "ofl-1.1",
        "pddl", "odc-by", "odbl", "osl-3.0", "lppl-1.3c", "eupl-1.1", "eupl-1.2", "cdla-permissive-1.0",
        "cdla-permissive-2.0", "cdla-sharing-1.0", "c-uda", "etalab-2.0", "gfdl", "pddl", "openrail",
    ], "permissive"),
    **dict.fromkeys([
        "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma", "bigscience-openrail-m",
        "creativeml-openrail-m", "bigscience-bloom-rail-1.0", "bigcode-openrail-m", "openrail++", "apple-ascl",
        "intel-research", "deepfloyd-if-license", "h-research", "fair-noncommercial-research-license",
    ], "custom"),
    **dict.fromkeys([
        "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0",
        "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nd-4.0", "apple-amlr", "llama-research",
    ], "non-commercial"),
}


def license_family(license_id: Optional[str]) -> str:
    """permissive / custom (community licenses with conditions) / non-commercial / unknown."""
    return LICENSE_FAMILIES.get((license_id or "").strip().lower(), "unknown")
