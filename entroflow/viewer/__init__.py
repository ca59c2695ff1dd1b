"""The entropy viewer (`entroflow view PATH`): data access and rendering are importable without
Dash; `entroflow.viewer.app` needs the `viewer` extra."""
