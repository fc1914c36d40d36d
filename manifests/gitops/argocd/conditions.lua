-- Argo CD health of a SecondSite object that reports conditions: VirtualProtectionGroup, Site and
-- ReplicationAppliance (docs/gitops.md). The same reading as kstatus and `kubectl wait`:
--   1. status.observedGeneration absent or not metadata.generation: the status describes an older
--      spec (or none yet) -> Progressing. A condition whose own observedGeneration is not the
--      current generation is ignored, as `kubectl wait --for=condition=...` ignores it.
--   2. Stalled=True -> Degraded: the operator cannot go on until someone changes something.
--   3. spec.paused (a VPG) -> Suspended.
--   4. Reconciling=True -> Progressing (e.g. a VPG's initial sync).
--   5. Ready: True -> Healthy; False -> Degraded, with its reason and message; otherwise Progressing.
local hs = {}
local generation = obj.metadata.generation
local status = obj.status

if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
    .. " (status is of generation " .. status.observedGeneration .. ")"
  return hs
end

local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.observedGeneration == nil or condition.observedGeneration == generation then
      conditions[condition.type] = condition
    end
  end
end

local function explain(condition)
  if condition.message ~= nil and condition.message ~= "" then
    return condition.reason .. ": " .. condition.message
  end
  return condition.reason
end

local function holds(name)
  return conditions[name] ~= nil and conditions[name].status == "True"
end

if holds("Stalled") then
  hs.status = "Degraded"
  hs.message = explain(conditions["Stalled"])
  return hs
end
if obj.spec ~= nil and obj.spec.paused == true then
  hs.status = "Suspended"
  hs.message = "Paused (spec.paused)"
  return hs
end
if holds("Reconciling") then
  hs.status = "Progressing"
  hs.message = explain(conditions["Reconciling"])
  return hs
end

local ready = conditions["Ready"]
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  if ready == nil then
    hs.message = "Waiting for the Ready condition"
  else
    hs.message = explain(ready)
  end
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = explain(ready)
else
  hs.status = "Degraded"
  hs.message = explain(ready)
end
return hs
