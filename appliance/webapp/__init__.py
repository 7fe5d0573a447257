"""The web app: a Gradio Blocks app that talks to the gateway's API (chat, knowledge, models)."""
