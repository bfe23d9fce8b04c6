// Fine-tuning on Azure Container Apps serverless GPUs: the shared environment (environment.bicep)
// and a manual-trigger job that runs infra/job.sh from the workspace on the mounted file share.
// Deploy with `python infra/remote.py provision-finetuning`; values in finetuning.parameters.json.

@description('Azure region of every resource.')
param location string = resourceGroup().location

@description('Lowercase letters, digits and hyphens; the start of every resource name.')
@minLength(1)
@maxLength(20)
param namePrefix string

@description('Serverless GPU workload profile type.')
@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuProfile string

@description('Container image with Python 3.11 and bash, pinned to a version; torch and the CUDA libraries come from setup/requirements-cuda.txt.')
param image string

@description('Azure Files share that holds the workspace.')
param shareName string = 'workspace'

@description('Share quota in GiB.')
@minValue(100)
@maxValue(5120)
param shareQuotaGiB int = 1024

@description('Longest a fine-tuning run may take, in seconds.')
@minValue(600)
@maxValue(86400)
param jobTimeoutSeconds int = 43200

@description('Hugging Face token for gated models; empty for none. Stored only as a Container Apps secret.')
@secure()
param hfToken string = ''

// Shared with infra/remote.py (set-secret): the secret and the variable that references it.
var hfTokenSecretName = 'hf-token'
var gpuProfileName = 'gpu'
var mountPath = '/mount'
// A serverless GPU replica gets the whole GPU and up to these cores and memory.
var cpu = gpuProfile == 'Consumption-GPU-NC24-A100' ? 24 : 8
var memory = gpuProfile == 'Consumption-GPU-NC24-A100' ? '220Gi' : '56Gi'
// Caches on the share, so a second run neither downloads packages nor the model again.
var cacheEnv = [
  {
    name: 'PIP_CACHE_DIR'
    value: '${mountPath}/.cache/pip'
  }
  {
    name: 'HF_HOME'
    value: '${mountPath}/.cache/huggingface'
  }
  {
    name: 'PYTHONUNBUFFERED'
    value: '1'
  }
]
var tokenEnv = empty(hfToken) ? [] : [
  {
    name: 'HF_TOKEN'
    secretRef: hfTokenSecretName
  }
]
var tokenSecret = empty(hfToken) ? [] : [
  {
    name: hfTokenSecretName
    value: hfToken
  }
]

module env 'environment.bicep' = {
  name: 'environment'
  params: {
    location: location
    namePrefix: namePrefix
    gpuProfile: gpuProfile
    gpuProfileName: gpuProfileName
    shareName: shareName
    shareQuotaGiB: shareQuotaGiB
  }
}

resource job 'Microsoft.App/jobs@2025-07-01' = {
  name: 'job-${namePrefix}'
  location: location
  properties: {
    environmentId: env.outputs.environmentId
    workloadProfileName: gpuProfileName
    configuration: {
      triggerType: 'Manual'
      replicaTimeout: jobTimeoutSeconds
      // A failed run resumes from its checkpoint when started again; never retry blindly on a GPU.
      replicaRetryLimit: 0
      manualTriggerConfig: {
        parallelism: 1
        replicaCompletionCount: 1
      }
      secrets: tokenSecret
    }
    template: {
      containers: [
        {
          name: 'finetune'
          image: image
          command: [
            'bash'
            '${mountPath}/infra/job.sh'
          ]
          resources: {
            cpu: cpu
            memory: memory
          }
          env: concat(cacheEnv, tokenEnv)
          volumeMounts: [
            {
              volumeName: 'workspace'
              mountPath: mountPath
            }
          ]
        }
      ]
      volumes: [
        {
          name: 'workspace'
          storageType: 'AzureFile'
          storageName: env.outputs.storageLinkName
          // mfsymlinks: the Hugging Face cache uses symlinks; nobrl: SQLite and file locks on SMB.
          mountOptions: 'mfsymlinks,nobrl'
        }
      ]
    }
  }
}

// Saved by remote.py to infra/finetuning.config.json (the AI Toolkit's field names).
output SUBSCRIPTION_ID string = subscription().subscriptionId
output RESOURCE_GROUP_NAME string = resourceGroup().name
output STORAGE_ACCOUNT_NAME string = env.outputs.storageAccountName
output FILE_SHARE_NAME string = env.outputs.shareName
output ACA_JOB_NAME string = job.name
