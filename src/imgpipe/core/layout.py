"""File names that the rules, the report and the library share (importable without
pandas or torch, so the Snakefile stays quick to parse)."""

# Each model's plots, written by its evaluate job next to its metrics.json, with the
# caption the report gives them, in the report's order.
MODEL_PLOTS = (
    ("confusion_matrix.png", "confusion matrix"),
    ("roc.png", "ROC curves"),
    ("reliability.png", "reliability diagram"),
    ("embedding.png", "penultimate-layer embedding"),
    ("confident_errors.png", "most confidently wrong test images"),
)
