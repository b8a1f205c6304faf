"""jmmshap: multimodal product classification, MM-SHAP modality shares and MM-SHAP-weighted stacking in JAX."""

__version__ = "0.1.0"
