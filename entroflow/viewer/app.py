"""`entroflow view PATH`: a Dash web app over a trace directory or an entropy file.

Layout, top to bottom: the step list (manifest statistics) beside entropy percentiles across
steps; the selected step's histogram with percentile thresholds and a word cloud of its
high-entropy tokens; its top-K highest/lowest entropy tokens; its responses; and the selected
response: the decoded prompt, a token heat-map and a token table with range filter, search, sort
and CSV export. A step is read only when selected (`EntropySource`).
"""

from __future__ import annotations

import base64
import functools
import io
import sys
from functools import lru_cache

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dash_table, dcc, html
from dash.exceptions import PreventUpdate

from entroflow.errors import EntroflowError
from entroflow.viewer.data import MAX_TOP_K, EntropySource, parse_bound, parse_top_k
from entroflow.viewer.render import heatmap_html, legend, token_view

THRESHOLDS = (50, 80, 95)
PAGE = {"margin": "0 auto", "maxWidth": "1400px", "fontFamily": "system-ui, sans-serif"}
ROW = {"display": "flex", "gap": "16px", "alignItems": "flex-start"}
CELL = {"fontFamily": "ui-monospace, monospace", "fontSize": "12px", "padding": "2px 6px"}
SMALL = {"width": "140px"}


def _table(id_: str, page_size: int = 10, **kwargs) -> dash_table.DataTable:
    return dash_table.DataTable(
        id=id_,
        page_size=page_size,
        sort_action="native",
        style_cell=CELL,
        style_table={"overflowX": "auto"},
        style_header={"fontWeight": "bold"},
        **kwargs,
    )


def _records(frame: pd.DataFrame, digits: int = 4) -> list[dict]:
    """Rows for a DataTable, floats rounded to `digits` significant figures."""
    out = frame.copy()
    for col in out.columns:
        if out[col].dtype.kind == "f":
            out[col] = [float(f"{v:.{digits}g}") if np.isfinite(v) else None for v in out[col]]
    return out.to_dict("records")


def _columns(frame: pd.DataFrame) -> list[dict]:
    return [{"name": c, "id": c} for c in frame.columns]


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


def one_line_errors(callback):
    """A bad step file or input met in a callback: one `error:` line on the server's console
    and the page left as it was, not a traceback."""

    @functools.wraps(callback)
    def guarded(*args):
        try:
            return callback(*args)
        except EntroflowError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise PreventUpdate from None

    return guarded


def build_app(source: EntropySource) -> Dash:
    app = Dash(__name__, title=f"entroflow · {source.path.name}")

    def callback(*args, **kwargs):  # app.callback, with one_line_errors
        return lambda function: app.callback(*args, **kwargs)(one_line_errors(function))

    steps = source.steps()
    first_step = int(steps["step"].iloc[0])
    app.layout = html.Div(
        style=PAGE,
        children=[
            html.H2(f"entroflow · {source.path} ({source.kind}, {len(steps)} steps)"),
            dcc.Store(id="step", data=first_step),
            dcc.Store(id="response", data=0),
            html.H4("steps (click a row)"),
            _table("steps-table", data=_records(steps), columns=_columns(steps)),
            html.H3(id="step-title"),
            html.Div(
                style=ROW,
                children=[
                    dcc.Graph(
                        id="percentiles", figure=percentiles_figure(steps), style={"flex": "1"}
                    ),
                    dcc.Graph(id="histogram", style={"flex": "1"}),
                    html.Div(
                        style={"flex": "1"},
                        children=[
                            html.H4("tokens above the step's P80"),
                            html.Img(id="wordcloud", style={"maxWidth": "100%"}),
                        ],
                    ),
                ],
            ),
            html.Div(
                style={**ROW, "alignItems": "center"},
                children=[
                    html.Label("top-K tokens per step, K = "),
                    dcc.Input(
                        id="top-k",
                        type="number",
                        min=1,
                        max=MAX_TOP_K,
                        value=20,
                        debounce=True,
                        style=SMALL,
                    ),
                ],
            ),
            html.Div(
                style=ROW,
                children=[
                    html.Div([html.H4("highest entropy"), _table("top-high")], style={"flex": "1"}),
                    html.Div([html.H4("lowest entropy"), _table("top-low")], style={"flex": "1"}),
                ],
            ),
            html.H4("responses (click a row to open it)"),
            _table("responses-table", page_size=15),
            html.H3(id="response-title"),
            html.Pre(
                id="prompt",
                style={"background": "#f4f4f4", "padding": "8px", "whiteSpace": "pre-wrap"},
            ),
            html.Div(
                style={**ROW, "flexWrap": "wrap", "alignItems": "center"},
                children=[
                    html.Label("colour"),
                    dcc.RadioItems(
                        id="scale",
                        options=[
                            {"label": "log entropy", "value": "log"},
                            {"label": "percentile in step", "value": "percentile"},
                        ],
                        value="log",
                        inline=True,
                    ),
                    html.Label("entropy from"),
                    dcc.Input(
                        id="h-min",
                        type="number",
                        placeholder="none",
                        debounce=True,
                        style=SMALL,
                    ),
                    html.Label("to"),
                    dcc.Input(
                        id="h-max",
                        type="number",
                        placeholder="none",
                        debounce=True,
                        style=SMALL,
                    ),
                    html.Label("search"),
                    dcc.Input(
                        id="search",
                        type="text",
                        placeholder="token text",
                        debounce=True,
                        style=SMALL,
                    ),
                    html.Label("sort"),
                    dcc.RadioItems(
                        id="sort",
                        options=[
                            {"label": "position", "value": "position"},
                            {"label": "entropy ↓", "value": "entropy-desc"},
                            {"label": "entropy ↑", "value": "entropy-asc"},
                        ],
                        value="position",
                        inline=True,
                    ),
                    html.Button("export CSV", id="export"),
                    dcc.Download(id="download"),
                ],
            ),
            html.Div(id="legend", style={"margin": "6px 0", "fontFamily": "monospace"}),
            html.Iframe(
                id="heatmap", style={"width": "100%", "height": "320px", "border": "1px solid #ddd"}
            ),
            html.Div(id="view-count", style={"margin": "6px 0"}),
            _table("tokens-table", page_size=25),
        ],
    )

    @lru_cache(maxsize=16)
    def cloud(step: int) -> str:  # the slowest part of opening a step: once per step
        return word_cloud_src(source.high_entropy_counts(step))

    @callback(
        Output("step", "data"),
        Input("steps-table", "active_cell"),
        State("steps-table", "derived_viewport_data"),
        prevent_initial_call=True,
    )
    def select_step(cell, rows):
        return int(rows[cell["row"]]["step"])

    @callback(
        Output("step-title", "children"),
        Output("histogram", "figure"),
        Output("wordcloud", "src"),
        Output("responses-table", "data"),
        Output("responses-table", "columns"),
        Output("response", "data"),
        Input("step", "data"),
    )
    def show_step(step):
        entropy = source.entropy(step)
        responses = source.responses(step)
        title = f"step {step}: {len(responses)} responses, {len(entropy):,} tokens"
        return (
            title,
            histogram_figure(entropy, step),
            cloud(step),
            _records(responses),
            _columns(responses),
            0,
        )

    @callback(
        Output("top-high", "data"),
        Output("top-high", "columns"),
        Output("top-low", "data"),
        Output("top-low", "columns"),
        Input("step", "data"),
        Input("top-k", "value"),
    )
    def show_extremes(step, k):
        high, low = source.extreme_tokens(step, parse_top_k(k))
        return _records(high), _columns(high), _records(low), _columns(low)

    @callback(
        Output("response", "data", allow_duplicate=True),
        Input("responses-table", "active_cell"),
        State("responses-table", "derived_viewport_data"),
        prevent_initial_call=True,
    )
    def select_response(cell, rows):
        return int(rows[cell["row"]]["response"])

    view_inputs = [
        Input("step", "data"),
        Input("response", "data"),
        Input("h-min", "value"),
        Input("h-max", "value"),
        Input("search", "value"),
        Input("sort", "value"),
    ]

    def current_view(step, response, h_min, h_max, search, sort):
        tokens = source.tokens(step, response)
        return tokens, token_view(tokens, parse_bound(h_min), parse_bound(h_max), search, sort)

    @callback(
        Output("response-title", "children"),
        Output("prompt", "children"),
        Output("legend", "children"),
        Output("heatmap", "srcDoc"),
        Output("tokens-table", "data"),
        Output("tokens-table", "columns"),
        Output("view-count", "children"),
        *view_inputs,
        Input("scale", "value"),
    )
    def show_response(step, response, h_min, h_max, search, sort, scale):
        tokens, view = current_view(step, response, h_min, h_max, search, sort)
        step_entropy = source.entropy(step)
        swatches = [html.Span("nats: ")] + [
            html.Span(label, style={"background": bg, "color": fg, "padding": "2px 8px"})
            for label, bg, fg in legend(step_entropy, scale)
        ]
        page = heatmap_html(
            tokens, step_entropy, scale, parse_bound(h_min), parse_bound(h_max), search
        )
        count = f"{len(view)} of {len(tokens)} tokens shown"
        if search:
            count += f" (matching '{search}')"
        return (
            f"step {step} · response {response}",
            source.prompt(step, response),
            swatches,
            page,
            _records(view),
            _columns(view),
            count,
        )

    @callback(
        Output("download", "data"),
        Input("export", "n_clicks"),
        *[State(i.component_id, i.component_property) for i in view_inputs],
        prevent_initial_call=True,
    )
    def export(_, step, response, h_min, h_max, search, sort):
        _, view = current_view(step, response, h_min, h_max, search, sort)
        return dcc.send_data_frame(
            view.to_csv, f"step{step}_response{response}_tokens.csv", index=False
        )

    return app


def serve(path: str, host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    source = EntropySource(path)
    app = build_app(source)
    print(f"entroflow view: {source.path} ({source.kind}) on http://{host}:{port}/", flush=True)
    app.run(host=host, port=port, debug=debug)
