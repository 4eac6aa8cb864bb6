"""Symbolic cost models: per-node and total MACs/FLOPs, other arithmetic, parameters and bytes."""

from .certificate import Certificate, certify
from .propagation import GraphInfo, InputSpec, NodeInfo, graph_cost, graph_info, propagate, symbol
from .symbolic import GraphCost, NodeCost

__all__ = ["Certificate", "GraphCost", "GraphInfo", "InputSpec", "NodeCost", "NodeInfo", "certify", "graph_cost",
           "graph_info", "propagate", "symbol"]
