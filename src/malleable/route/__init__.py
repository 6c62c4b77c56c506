"""`route`: choose which model or adapter answers each query under a cost budget (routers registered by name,
fitted and compared on quality and cost matrices)."""

from malleable.route import (  # noqa: F401  (registration)
    arrow, centroid, cheapest, kmeans, knn, linear, mf, mlp, oracle, prknn, random_mix, soft_label, strongest,
    strongest_per_task,
)
from malleable.route.matrices import Matrices, read_matrices
from malleable.route.registry import ROUTERS, Router, get_router, router
from malleable.route.serve import RoutedModel

__all__ = ["Matrices", "ROUTERS", "RoutedModel", "Router", "get_router", "read_matrices", "router"]
