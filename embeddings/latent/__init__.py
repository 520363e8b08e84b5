"""A meta-space column: one latent vector per row learned over one or several columns.

An autoencoder (``ae``) or a variational autoencoder (``vae``) over, e.g.,
``clip_image + minilm_text``, trained on every row with no labels; modality dropout lets
a row that lacks one input still get a latent.  Formulas in :mod:`.model`, training in
:mod:`.train`, files in :mod:`.io`.  Use::

    from embeddings.latent import LatentParams, fit_latent, load_latent
    model = fit_latent([img, txt], [has_img, has_txt], [img_val, txt_val])
    z = model.encode([img, txt], [has_img, has_txt])     # (n, dim) float32
"""

from .io import check_latent_inputs, latent_provenance, load_latent, save_latent
from .model import KINDS, LatentModel, pca_error
from .train import LatentParams, fit_latent

__all__ = ["KINDS", "LatentModel", "LatentParams", "check_latent_inputs", "fit_latent",
           "latent_provenance", "load_latent", "pca_error", "save_latent"]
