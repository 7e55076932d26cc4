"""Interpretation of conv filters by CAR (the CAR paper, Sections 3.2-3.3, Figures 5-9).

`interpret(model, layer, data)` gives an `InterpretationReport`: per filter its CAR, rank, whether
and when a compression removed it, the classes of highest and lowest CAR_c, its top activating
image patches; for first layers the filters drawn from their weights and their colour
selectivity; with a compressed model, per-class accuracy against the original. `save_html`
writes one self-contained page plus PNGs and JSON. `build_report` does the same from saved
scores or a saved compression result (the `carprune report` command), whose landing page (one
table of the layers, each linking to its page) comes from `landing`.

Class lists hold only classes whose accuracy changes without the filter (CAR_c > 0: loses,
CAR_c < 0: gains); when fewer than asked qualify, the report says so.
"""

from .classes import ClassAccuracy, ClassImportance, ClassScore, class_accuracy, class_importance
from .colour import ColourSummary, colour_selectivity, colour_summary
from .patches import PatchSearch, TopK, search_patches
from .receptive import ReceptiveField, receptive_field
from .report import FilterInfo, InterpretationReport, Patch, build_report, interpret

__all__ = [
    "ClassAccuracy",
    "ClassImportance",
    "ClassScore",
    "ColourSummary",
    "FilterInfo",
    "InterpretationReport",
    "Patch",
    "PatchSearch",
    "ReceptiveField",
    "TopK",
    "build_report",
    "class_accuracy",
    "class_importance",
    "colour_selectivity",
    "colour_summary",
    "interpret",
    "receptive_field",
    "search_patches",
]
