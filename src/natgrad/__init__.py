"""natgrad: natural-gradient optimizers and Fisher curvature for PyTorch."""

from natgrad.curvature.dense import fisher_matrix
from natgrad.curvature.kfac import kfac_factors
from natgrad.curvature.model import FisherTooLargeError
from natgrad.curvature.products import conjugate_gradient, fisher_vector_product
from natgrad.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, get_likelihood
from natgrad.optim.cg import NGDCG
from natgrad.optim.kfac import EKFAC, KFAC
from natgrad.optim.ngd import NaturalGradient

__all__ = [
    "Bernoulli",
    "Categorical",
    "EKFAC",
    "FisherTooLargeError",
    "Gaussian",
    "KFAC",
    "Likelihood",
    "NGDCG",
    "NaturalGradient",
    "conjugate_gradient",
    "fisher_matrix",
    "fisher_vector_product",
    "get_likelihood",
    "kfac_factors",
]
__version__ = "0.1.0"
