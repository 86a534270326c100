"""SVG2 generation: videos -> scene-graph records, in six stages (PyTorch, SAM2, an LLM endpoint).

Each stage is a function of one video's inputs, so both engines run the same code:

    video.decode_video           PyAV decode at the native rate (VideoError on a bad file)
    proposals.propose            1. automatic masks every k-th frame + largest-first filter
    tracking.track               2. online-offline tracker over a `Propagator` (SAM2 or an oracle)
    cleanup.cleanup              3. containment duplicates, 3x3 opening, small masks
    describe.describe_objects    4. descriptions (OpenAI-compatible vision endpoint, or DAM)
    parse.parse_descriptions     5. {name, uncertain, attributes} per object
    relations.extract_relations  6. spatial and typed temporal relations with spans

`job` runs them on one video with its cache (`cache`), `engines` over many
(in-process or Ray), `run.run_job` writes the shards; `python -m
data_gen.generate` is the command line. `sam2_backend` adapts SAM2, `llm` is the
endpoint client (retries, strict JSON, response cache, cost), `tracker_eval`
scores tracks against ground truth with an oracle, `loopback` is a local
OpenAI-compatible server for tests. Settings: `config`, configs/svg2_generate.yaml.
"""
