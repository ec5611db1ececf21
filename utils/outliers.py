"""The median-absolute-deviation outlier test, shared by NC (anomaly index of the reversed triggers' norms) and ULRL
(modified z-score of the neurons' weight changes)."""
import math

import torch

MAD_CONSISTENCY = 1.4826  # MAD * 1.4826 estimates the standard deviation of normally distributed values


def anomaly_index(values):
    """|v - median| / (1.4826 * MAD) for each value, in the values' dtype. The median of an even count is the lower
    middle value (torch's, as BackdoorBench and the ULRL reference compute it). With MAD 0: 0 at the median,
    infinite elsewhere."""
    values = torch.as_tensor(values)
    deviation = (values - values.median()).abs()
    mad = MAD_CONSISTENCY * deviation.median()
    if mad == 0:
        return torch.where(deviation == 0, 0.0, math.inf).to(deviation.dtype)
    return deviation / mad


def small_outliers(values, threshold):
    """The indices of the values below the median whose anomaly index is above `threshold`, smallest value first
    (NC's flagged classes: a backdoor target needs an unusually small trigger)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    small = (values < values.median()) & (anomaly_index(values) > threshold)
    return sorted(small.nonzero().flatten().tolist(), key=lambda k: float(values[k]))
