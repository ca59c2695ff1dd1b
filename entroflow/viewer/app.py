"""`entroflow view PATH`: a Dash web app over a trace directory or an entropy file.

Layout, top to bottom: the step list (manifest statistics) beside entropy percentiles across
steps; the selected step's histogram with percentile thresholds and a word cloud of its
high-entropy tokens; its top-K highest/lowest entropy tokens; its responses; and the selected
response: the decoded prompt, a token heat-map and a token table with range filter, search, sort
and CSV export. A step is read only when selected (`EntropySource`).
"""

from __future__ import annotations

import functools
import sys
from functools import lru_cache

import numpy as np
import pandas as pd
from dash import Dash, Input, Output, State, dash_table, dcc, html
from dash.exceptions import PreventUpdate

from entroflow.errors import EntroflowError
from entroflow.viewer.data import MAX_TOP_K, EntropySource, parse_bound, parse_top_k
from entroflow.viewer.figures import histogram_figure, percentiles_figure, word_cloud_src
from entroflow.viewer.render import heatmap_html, legend, token_view

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
    """The page (`layout`) and the callbacks that fill it (`register_callbacks`)."""
    app = Dash(__name__, title=f"entroflow · {source.path.name}")
    app.layout = layout(source)
    register_callbacks(app, source)
    return app


# ---- layout: declarative, top to bottom ----


def layout(source: EntropySource) -> html.Div:
    steps = source.steps()
    return html.Div(
        style=PAGE,
        children=[
            html.H2(f"entroflow · {source.path} ({source.kind}, {len(steps)} steps)"),
            dcc.Store(id="step", data=int(steps["step"].iloc[0])),
            dcc.Store(id="response", data=0),
            *_step_section(steps),
            *_top_k_section(),
            html.H4("responses (click a row to open it)"),
            _table("responses-table", page_size=15),
            html.H3(id="response-title"),
            html.Pre(
                id="prompt",
                style={"background": "#f4f4f4", "padding": "8px", "whiteSpace": "pre-wrap"},
            ),
            _response_controls(),
            html.Div(id="legend", style={"margin": "6px 0", "fontFamily": "monospace"}),
            html.Iframe(
                id="heatmap", style={"width": "100%", "height": "320px", "border": "1px solid #ddd"}
            ),
            html.Div(id="view-count", style={"margin": "6px 0"}),
            _table("tokens-table", page_size=25),
        ],
    )


def _step_section(steps: pd.DataFrame) -> list:
    """The step list, then the selected step's percentiles, histogram and word cloud."""
    return [
        html.H4("steps (click a row)"),
        _table("steps-table", data=_records(steps), columns=_columns(steps)),
        html.H3(id="step-title"),
        html.Div(
            style=ROW,
            children=[
                dcc.Graph(id="percentiles", figure=percentiles_figure(steps), style={"flex": "1"}),
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
    ]


def _top_k_section() -> list:
    """The K input and the step's K highest and lowest entropy tokens."""
    return [
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
    ]


def _number_input(id_: str) -> dcc.Input:
    return dcc.Input(id=id_, type="number", placeholder="none", debounce=True, style=SMALL)


def _response_controls() -> html.Div:
    """Colour scale, entropy range, search, sort and CSV export of the open response."""
    return html.Div(
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
            _number_input("h-min"),
            html.Label("to"),
            _number_input("h-max"),
            html.Label("search"),
            dcc.Input(
                id="search", type="text", placeholder="token text", debounce=True, style=SMALL
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
    )


# ---- callbacks: what each control changes ----

# The inputs that select the open response's token view (shown, and exported as CSV).
VIEW_INPUTS = (
    ("step", "data"),
    ("response", "data"),
    ("h-min", "value"),
    ("h-max", "value"),
    ("search", "value"),
    ("sort", "value"),
)


class Callbacks:
    """The app's callbacks over one `EntropySource`; `register_callbacks` wires them to the page."""

    def __init__(self, source: EntropySource):
        self.source = source
        # the slowest part of opening a step: once per step
        self.cloud = lru_cache(maxsize=16)(self._cloud)

    def _cloud(self, step: int) -> str:
        return word_cloud_src(self.source.high_entropy_counts(step))

    def select_step(self, cell, rows):
        return int(rows[cell["row"]]["step"])

    def show_step(self, step):
        entropy = self.source.entropy(step)
        responses = self.source.responses(step)
        title = f"step {step}: {len(responses)} responses, {len(entropy):,} tokens"
        return (
            title,
            histogram_figure(entropy, step),
            self.cloud(step),
            _records(responses),
            _columns(responses),
            0,
        )

    def show_extremes(self, step, k):
        high, low = self.source.extreme_tokens(step, parse_top_k(k))
        return _records(high), _columns(high), _records(low), _columns(low)

    def select_response(self, cell, rows):
        return int(rows[cell["row"]]["response"])

    def current_view(self, step, response, h_min, h_max, search, sort):
        tokens = self.source.tokens(step, response)
        return tokens, token_view(tokens, parse_bound(h_min), parse_bound(h_max), search, sort)

    def show_response(self, step, response, h_min, h_max, search, sort, scale):
        tokens, view = self.current_view(step, response, h_min, h_max, search, sort)
        step_entropy = self.source.entropy(step)
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
            self.source.prompt(step, response),
            swatches,
            page,
            _records(view),
            _columns(view),
            count,
        )

    def export(self, _, step, response, h_min, h_max, search, sort):
        _, view = self.current_view(step, response, h_min, h_max, search, sort)
        return dcc.send_data_frame(
            view.to_csv, f"step{step}_response{response}_tokens.csv", index=False
        )


def register_callbacks(app: Dash, source: EntropySource) -> None:
    """Wire each of `Callbacks`' methods to its outputs and inputs, errors as one line."""
    calls = Callbacks(source)

    def wire(function, *dependencies, **kwargs):
        app.callback(*dependencies, **kwargs)(one_line_errors(function))

    def outputs(id_: str, *properties: str) -> list[Output]:
        return [Output(id_, p) for p in properties]

    view = [Input(id_, prop) for id_, prop in VIEW_INPUTS]
    wire(
        calls.select_step,
        Output("step", "data"),
        Input("steps-table", "active_cell"),
        State("steps-table", "derived_viewport_data"),
        prevent_initial_call=True,
    )
    wire(
        calls.show_step,
        Output("step-title", "children"),
        Output("histogram", "figure"),
        Output("wordcloud", "src"),
        *outputs("responses-table", "data", "columns"),
        Output("response", "data"),
        Input("step", "data"),
    )
    wire(
        calls.show_extremes,
        *outputs("top-high", "data", "columns"),
        *outputs("top-low", "data", "columns"),
        Input("step", "data"),
        Input("top-k", "value"),
    )
    wire(
        calls.select_response,
        Output("response", "data", allow_duplicate=True),
        Input("responses-table", "active_cell"),
        State("responses-table", "derived_viewport_data"),
        prevent_initial_call=True,
    )
    wire(
        calls.show_response,
        Output("response-title", "children"),
        Output("prompt", "children"),
        Output("legend", "children"),
        Output("heatmap", "srcDoc"),
        *outputs("tokens-table", "data", "columns"),
        Output("view-count", "children"),
        *view,
        Input("scale", "value"),
    )
    wire(
        calls.export,
        Output("download", "data"),
        Input("export", "n_clicks"),
        *[State(id_, prop) for id_, prop in VIEW_INPUTS],
        prevent_initial_call=True,
    )


def serve(path: str, host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    source = EntropySource(path)
    app = build_app(source)
    print(f"entroflow view: {source.path} ({source.kind}) on http://{host}:{port}/", flush=True)
    app.run(host=host, port=port, debug=debug)
