-- wrk: POST a small chat completion (BENCH_BODY overrides the body, BENCH_AUTH adds a bearer key).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"model":"bench-model","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = "Bearer " .. auth end

-- BENCH_UNIQUE=<nonce>: every request a different cacheable body (temperature 0), so a
-- gateway with a response cache looks up and misses on every call (the nonce differs per run)
local nonce = os.getenv("BENCH_UNIQUE")
if nonce and nonce ~= "" then
  local n = 0
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, string.format(
      '{"model":"bench-model","messages":[{"role":"user","content":"Say hello in one short sentence. %s-%d"}],"max_tokens":16,"temperature":0}',
      nonce, n))
  end
end

-- a non-2xx answer counts as an error in the summary
local failed = 0
response = function(status, headers, body)
  if status ~= 200 then failed = failed + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("BENCH p50_us=%d p99_us=%d mean_us=%.1f requests=%d non2xx=%d\n",
    latency:percentile(50), latency:percentile(99), latency.mean, summary.requests,
    summary.errors.status))
end
