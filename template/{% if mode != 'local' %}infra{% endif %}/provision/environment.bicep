// Shared by finetuning.bicep and inference.bicep: the storage account and file share that hold
// the workspace, Log Analytics, and a Container Apps environment with a serverless GPU profile.
// Deploying it twice with the same parameters changes nothing, so both deployments include it.

@description('Azure region of every resource.')
param location string

@description('Lowercase letters, digits and hyphens; the start of every resource name.')
@minLength(1)
@maxLength(20)
param namePrefix string

@description('Serverless GPU workload profile type (no dedicated capacity, no support ticket).')
@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
param gpuProfile string

@description('Name of the workload profile inside the environment that jobs and apps run on.')
param gpuProfileName string

@description('Azure Files share that holds the workspace, mounted by the job and the app.')
param shareName string

@description('Share quota in GiB.')
@minValue(100)
@maxValue(5120)
param shareQuotaGiB int

// Storage account names are global, 3-24 lowercase letters and digits: 'st', at most 9 from the
// prefix, and 13 from uniqueString() (lowercase letters and digits, stable per resource group).
var storageName = '${take('st${toLower(replace(namePrefix, '-', ''))}', 11)}${uniqueString(resourceGroup().id)}'

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${namePrefix}'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  //checkov:skip=CKV_AZURE_35:Serverless Container Apps (no VNet) mount the share over its public endpoint, and `remote.py upload` runs from the user's machine; access needs the account key over TLS 1.2.
  //checkov:skip=CKV_AZURE_43:The name is computed (see storageName above: 'st' + prefix + uniqueString(), at most 24 lowercase letters and digits), which checkov cannot evaluate.
  //checkov:skip=CKV_AZURE_206:The share holds a copy of the workspace, pip/Hugging Face caches and adapters that `remote.py fetch` copies home; locally redundant storage is enough and costs half.
  name: storageName
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    // Container Apps mount Azure Files with the account key; nothing else uses shared keys.
    allowSharedKeyAccess: true
    largeFileSharesState: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource fileServices 'Microsoft.Storage/storageAccounts/fileServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    shareDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource share 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-05-01' = {
  parent: fileServices
  name: shareName
  properties: {
    shareQuota: shareQuotaGiB
    enabledProtocols: 'SMB'
  }
}

resource environment 'Microsoft.App/managedEnvironments@2025-07-01' = {
  name: 'cae-${namePrefix}'
  location: location
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: logs.properties.customerId
        sharedKey: logs.listKeys().primarySharedKey
      }
    }
    zoneRedundant: false
    // Serverless profiles are billed per second while a replica runs and take no min/max counts.
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
      {
        name: gpuProfileName
        workloadProfileType: gpuProfile
      }
    ]
  }
}

resource environmentStorage 'Microsoft.App/managedEnvironments/storages@2025-07-01' = {
  parent: environment
  name: 'workspace'
  properties: {
    azureFile: {
      accountName: storage.name
      accountKey: storage.listKeys().keys[0].value
      shareName: share.name
      accessMode: 'ReadWrite'
    }
  }
}

output environmentId string = environment.id
output storageLinkName string = environmentStorage.name
output storageAccountName string = storage.name
output shareName string = share.name
