-- wrk: POST a ~5 KB Anthropic Messages body; STREAM=1 in the environment asks for SSE.
local stream = os.getenv("STREAM") == "1"
local filler = string.rep("Placeholder context line for the benchmark prompt. ", 95)
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.headers["x-api-key"] = os.getenv("GATEWAY_KEY") or "pg-bench-0123456789abcdef"
wrk.body = '{"model":"claude-sonnet-5","max_tokens":64,"stream":' .. (stream and "true" or "false") ..
  ',"system":"You are a benchmark.","messages":[{"role":"user","content":"' .. filler .. '"}]}'

done = function(summary, latency, requests)
  io.write(string.format("JSON {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
    "\"max_us\":%d,\"errors\":%d}\n", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
