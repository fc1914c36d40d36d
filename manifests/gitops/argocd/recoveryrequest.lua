-- Argo CD health of a SecondSite RecoveryRequest, from status.phase (docs/gitops.md):
--   no status yet, or status of an older generation (e.g. spec.action was just set) -> Progressing;
--   Pending, Preparing, Committing, RollingBack, Stopping                          -> Progressing;
--   Ready (recovered, waiting for spec.action or the commit policy)                 -> Healthy;
--   Completed, RolledBack (the operation ended as asked)                           -> Healthy;
--   Failed                                  -> Degraded, with the Stalled or Ready condition's words.
local hs = {}
local generation = obj.metadata.generation
local status = obj.status

if status == nil or status.observedGeneration == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to start the recovery"
  return hs
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
    .. " (status is of generation " .. status.observedGeneration .. ")"
  return hs
end

local function condition_message(name)
  if status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == name and condition.status ~= "Unknown" then
      if condition.message ~= nil and condition.message ~= "" then
        return condition.reason .. ": " .. condition.message
      end
      return condition.reason
    end
  end
  return nil
end

local phase = status.phase
local progressing = {
  Pending = true, Preparing = true, Committing = true, RollingBack = true, Stopping = true,
}
if progressing[phase] then
  hs.status = "Progressing"
  hs.message = condition_message("Reconciling") or phase
elseif phase == "Ready" then
  hs.status = "Healthy"
  hs.message = "Recovered volumes are usable"
  if status.commitDeadline ~= nil then
    hs.message = hs.message .. "; the commit policy acts at " .. status.commitDeadline
      .. " unless spec.action is set first"
  end
elseif phase == "Completed" then
  hs.status = "Healthy"
  hs.message = "Completed"
elseif phase == "RolledBack" then
  hs.status = "Healthy"
  hs.message = "Rolled back"
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = condition_message("Stalled") or condition_message("Ready") or "Failed"
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase
end
return hs
