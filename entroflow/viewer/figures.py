"""The viewer's figures: entropy percentiles across steps, one step's histogram with its percentile
thresholds, and the word cloud of a step's high-entropy tokens."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go

THRESHOLDS = (50, 80, 95)


def percentiles_figure(steps: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for col in [c for c in ("p50", "p80", "p90", "p95", "p99", "mean") if c in steps]:
        fig.add_trace(go.Scatter(x=steps["step"], y=steps[col], mode="lines+markers", name=col))
    fig.update_layout(
        title="entropy percentiles across steps (nats)",
        xaxis_title="step",
        yaxis_type="log",
        height=320,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
    )
    return fig


def histogram_figure(entropy: np.ndarray, step: int) -> go.Figure:
    fig = go.Figure(go.Histogram(x=entropy, nbinsx=80, marker_color="#3b528b"))
    colours = ("#5ec962", "#e4572e", "#440154")
    for i, (q, colour) in enumerate(zip(THRESHOLDS, colours, strict=True)):
        if len(entropy):
            v = float(np.percentile(entropy, q))
            fig.add_vline(x=v, line_color=colour, line_dash="dash")
            fig.add_annotation(
                x=v,
                y=1 - 0.1 * i,  # staggered: the thresholds are often close together
                yref="paper",
                xanchor="left",
                text=f"P{q} {v:.3g}",
                showarrow=False,
                font={"color": colour},
            )
    fig.update_layout(
        title=f"step {step}: {len(entropy):,} tokens",
        xaxis_title="entropy (nats)",
        yaxis_type="log",
        yaxis_title="tokens",
        height=320,
        margin={"l": 50, "r": 10, "t": 40, "b": 40},
    )
    return fig


def word_cloud_src(counts: pd.Series) -> str:
    """A PNG data URL of the step's high-entropy tokens (empty when there are none)."""
    if counts.empty:
        return ""
    from wordcloud import WordCloud

    cloud = WordCloud(width=440, height=300, background_color="white", colormap="viridis")
    image = cloud.generate_from_frequencies(counts.to_dict()).to_image()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
