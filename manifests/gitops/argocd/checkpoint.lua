-- Argo CD health of a SecondSite Checkpoint (a tagged checkpoint), from status.phase
-- (docs/gitops.md). A PreSync hook that creates a Checkpoint holds the sync until it is Healthy:
--   no status yet, status of an older generation, or Pending -> Progressing;
--   Ready (in the journal)                                  -> Healthy;
--   Expired (older than the journal's history: its life's normal end, no longer recoverable)
--                                                           -> Healthy, saying so;
--   Failed                                                  -> Degraded, with status.message.
local hs = {}
local generation = obj.metadata.generation
local status = obj.status

if status == nil or status.observedGeneration == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the journal to take the checkpoint"
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
    .. " (status is of generation " .. status.observedGeneration .. ")"
  return hs
end

local phase = status.phase
if phase == "Pending" then
  hs.status = "Progressing"
  hs.message = "Pending"
elseif phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "In the journal"
  if status.time ~= nil then
    hs.message = hs.message .. ", taken at " .. status.time
  end
  if status.consistent == false then
    hs.message = hs.message .. " (during a bitmap sync: not write-order consistent)"
  end
elseif phase == "Expired" then
  hs.status = "Healthy"
  hs.message = "Expired: older than the journal's history, no longer recoverable"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = status.message or "Failed"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase
end
return hs
