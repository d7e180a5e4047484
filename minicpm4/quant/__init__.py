"""Weight quantization: INT4 (RTN, GPTQ, P-GPTQ, S-P-GPTQ) and BitCPM4 ternary, behind one verb.

    from minicpm4.quant import quantize_, GPTQConfig
    report = quantize_(model, GPTQConfig(prefix_tokens=4), calibration=[ids, ...])
"""

from minicpm4.quant.api import detect_fake_ternary, quantize_, target_linears
from minicpm4.quant.configs import (GPTQConfig, Int4WeightOnlyConfig, LayerReport, PGPTQConfig, QuantReport,
                                    TernaryQATConfig)
from minicpm4.quant.linear import FakeTernaryLinear, Int4Linear, QuantLinearBase, TernaryLinear, dense_weight

__all__ = ["quantize_", "detect_fake_ternary", "target_linears", "GPTQConfig", "Int4WeightOnlyConfig", "PGPTQConfig",
           "TernaryQATConfig", "LayerReport", "QuantReport", "Int4Linear", "TernaryLinear", "FakeTernaryLinear",
           "QuantLinearBase", "dense_weight"]
