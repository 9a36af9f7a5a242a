-- wrk script: POST a ~5 KB Anthropic Messages body. Environment: STREAM=1 asks for SSE, API_KEY is sent
-- as x-api-key (and as a bearer token when BEARER=1, for LiteLLM), MODEL names the model.
local stream = os.getenv("STREAM") == "1"
local key = os.getenv("API_KEY") or os.getenv("GATEWAY_KEY") or "pg-bench-0123456789abcdef"
local model = os.getenv("MODEL") or "claude-sonnet-4-5"
-- Same text as load.py's FILLER, so wrk and the TTFB client send the same size.
local filler = string.rep("Placeholder context line for the benchmark prompt. ", 95)

wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = key
if os.getenv("BEARER") == "1" then
  wrk.headers["authorization"] = "Bearer " .. key
end
wrk.body = '{"model":"' .. model .. '","max_tokens":64,"stream":' .. (stream and "true" or "false") ..
  ',"system":"You are a benchmark.","messages":[{"role":"user","content":"' .. filler .. '"}]}'

-- One machine-readable line for run.py; non-2xx answers count as errors, as do socket errors.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
